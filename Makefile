# The README's two commands. Both work on a fresh machine: they install what they need first.
.PHONY: demo test
demo:
	./scripts/setup.sh && .venv/bin/mlx_qlora demo
test:
	./scripts/setup.sh test && .venv/bin/python -m pytest -q --durations=10
