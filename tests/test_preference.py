"""Preference tuning (train/preference.py): DPO and ORPO on a tiny llama, checked against
transformers (answer log-probabilities) and TRL (its loss code run on the same log-probabilities).

TRL 1.16's DPOTrainer computes its losses inside ``_compute_loss`` (model call included); the
test runs that method with a stand-in model returning our per-token log-probabilities and a
stand-in trainer holding the few attributes it reads, so TRL's own arithmetic is what compares.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import mlx_qlora  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map

from lora_fixtures import converted, write_adapter
from mlx_qlora.cli import main
from mlx_qlora.train import distributed as dist
from mlx_qlora.train import preference
from mlx_qlora.train.config import load_config
from mlx_qlora.train.loop import load_base, prepare_model, train
from mlx_qlora.train.preference_data import collate_pairs, load_pairs
from tolerance import tol

QUESTIONS = ["What is the capital of France?", "Name a prime number.", "SELECT the user names",
             "Translate 'hello' to French.", "How many legs has a spider?", "Give a colour of the sky.",
             "What is two plus three?", "Spell the word cat.", "Which planet is red?", "Say yes or no."]
GOOD = ["Paris", "7", "SELECT name FROM users", "bonjour", "eight", "blue", "five", "c a t", "Mars", "yes"]
BAD = ["the capital is Lyon, a city in the south", "four", "DROP TABLE users", "hola amigo", "six legs",
       "green", "23", "dog", "Venus is", "maybe"]


@pytest.fixture(scope="module")
def calm_hf(tmp_path_factory) -> Path:
    """The tiny llama with its (tied) embedding scaled by 0.1: per-token log-probs of a few nats,
    as a trained model's, instead of the hundreds that the unit-variance embedding gives (where
    a 1e-4 bound on a sum would be below float32's resolution)."""
    import tiny
    from safetensors.numpy import load_file, save_file

    d = tiny.write_hf_dir(tmp_path_factory.mktemp("calm_hf"), arch="llama", seed=3)
    w = load_file(str(d / "model.safetensors"))
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] * np.float32(0.1)
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory, calm_hf) -> Path:
    return converted(tmp_path_factory, calm_hf, "calm_q4", q_group_size=32)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """12 train pairs (text form) and 4 validation pairs (chat form, implicit prompt)."""
    d = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": QUESTIONS[i % 10], "chosen": GOOD[i % 10], "rejected": BAD[(i * 3) % 10] + f" ({i})"}
            for i in range(12)]
    chat = [{"chosen": [{"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": GOOD[i]}],
             "rejected": [{"role": "user", "content": QUESTIONS[i]}, {"role": "assistant", "content": BAD[i]}]}
            for i in range(4)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    return d


def config(model, data, out, **kw):
    base = {"model": str(model), "out_dir": str(out), "steps": 4, "batch_size": 4, "progress": False,
            "checkpoint_every": 0, "eval_every": 0, "data.train": str(data), "method": "dpo",
            "lora.rank": 4, "lora.alpha": 8.0, "optim.learning_rate": 1e-2, "optim.schedule": "constant"}
    base.update(kw)
    return load_config(None, base)


def setup(model_dir, data, cfg_kw=None, adapter=None):
    """(model, pairs, StepFns) as train() builds them; ``adapter``: nonzero policy weights."""
    cfg = config(model_dir, data, "unused", **(cfg_kw or {}))
    model, tok = load_base(cfg.model)
    prepare_model(model)
    ds = load_pairs(cfg.data, tok, cfg.preference, cfg.seed)
    mx.random.seed(cfg.seed)
    start = preference.start_adapter(model, cfg)
    if adapter is not None:   # the policy moves away from the reference (the starting adapter)
        model.load_weights(list(mx.load(str(adapter / "adapters.safetensors")).items()), strict=False)
    fns = preference.make_step_fns(model, cfg, ds, start, dist.World(), say=lambda *_: None)
    return model, ds, fns, cfg


def token_logps(model, b) -> np.ndarray:
    """(2 * pairs, T) per-token answer log-probs (0 elsewhere) through our own code path."""
    seq_logps = preference.make_seq_logps(model)
    inputs, targets, index, _ = preference.batch_arrays(b)
    per_token = np.array(seq_logps(model, inputs, targets, index, mx.eye(b.loss_index.size)))
    out = np.zeros(b.inputs.size, np.float32)
    out[b.loss_index] = per_token
    return out.reshape(b.inputs.shape)


# ------------------------------------------------------------------ parity
def test_answer_logps_match_transformers(calm_hf, tmp_path_factory, pairs_dir):
    """Sum of answer-token log-probs, MLX fp32 model vs transformers on the same weights: <= 1e-4."""
    import torch
    from transformers import AutoModelForCausalLM

    f32 = converted(tmp_path_factory, calm_hf, "calm_f32", quantize=False, dtype="float32")
    model, ds, _, _ = setup(f32, pairs_dir, {"method": "orpo"})
    hf = AutoModelForCausalLM.from_pretrained(str(calm_hf), dtype=torch.float32).eval()
    pairs = ds.train[:4] + ds.valid[:2]   # text and chat rows
    b = collate_pairs(pairs)
    ours = np.array(preference.make_seq_logps(model)(model, *preference.batch_arrays(b)))
    ref = []
    for ex in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
        with torch.no_grad():
            logits = hf(torch.tensor(ex.tokens[None].astype(np.int64))).logits[0].double()
        lp = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ex.tokens[1:, None].astype(np.int64)))[:, 0]
        ref.append(float(lp[torch.tensor(ex.mask[1:])].sum()))
    ref = np.array(ref)
    assert np.abs(ours - ref).max() <= tol(1e-4), np.abs(ours - ref).max()
    assert np.abs(ref[:6] - ref[6:]).min() > 1e-2   # chosen and rejected really differ


def trl_dpo(per_token, completion_mask, ref_c, ref_r, beta, loss_type, label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on given per-token log-probs: (loss, TRL's logged metrics)."""
    torch = pytest.importorskip("torch")
    DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer
    n = per_token.shape[0]

    class Model(torch.nn.Module):
        training = True

        def forward(self, **kw):
            t = torch.tensor(per_token[:, 1:], dtype=torch.float32)
            z = torch.zeros_like(t)
            return SimpleNamespace(log_probs=t, entropy=z, mean_logits=z, is_top1=z.bool())

    acc = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x,
                          unwrap_model=lambda m: m)
    me = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                         ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                         loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                         use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                         _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros((n, per_token.shape[1]), dtype=torch.long),
              "attention_mask": torch.ones((n, per_token.shape[1]), dtype=torch.long),
              "completion_mask": torch.tensor(completion_mask, dtype=torch.long),
              "ref_chosen_logps": torch.tensor(ref_c, dtype=torch.float32),
              "ref_rejected_logps": torch.tensor(ref_r, dtype=torch.float32)}
    loss = DPOTrainer._compute_loss(me, Model(), inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in me._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.2)])
def test_dpo_first_step_loss_matches_trl(tiny_q4, pairs_dir, tmp_path, loss_type, smoothing):
    """A policy adapter against the base as reference: our loss and metrics = TRL's on our
    log-probs, <= 1e-5. TRL 1.16's sigmoid has no label smoothing; its ``aot`` loss is the
    conservative-DPO form and, with one pair per batch (its sort is then the identity), equals it."""
    adapter = write_adapter(tmp_path / "policy", tiny_q4, b_std=0.3, rank=4, alpha=8.0)
    kw = {"preference.loss_type": loss_type, "preference.label_smoothing": smoothing, "preference.beta": 0.5}
    model, ds, fns, _ = setup(tiny_q4, pairs_dir, kw, adapter)
    b = collate_pairs(ds.train[:4])
    ours = fns.loss(b) / b.n_loss
    mine = fns.metrics("valid")
    per_token = token_logps(model, b)
    width = b.inputs.shape[1]
    completion = np.zeros((8, width + 1), np.int64)   # TRL's mask is over input ids, shifted inside
    completion.reshape(-1)[(b.loss_index // width) * (width + 1) + b.loss_index % width + 1] = 1
    per_tok = np.concatenate([np.zeros((8, 1), np.float32), per_token], 1)
    ref = np.array([p.ref for p in ds.train[:4]], np.float32)
    if smoothing:
        trl = [trl_dpo(per_tok[[i, i + 4]], completion[[i, i + 4]], ref[i:i + 1, 0], ref[i:i + 1, 1], 0.5,
                       "aot", smoothing)[0] for i in range(4)]
        theirs, metrics = float(np.mean(trl)), None
    else:
        theirs, metrics = trl_dpo(per_tok, completion, ref[:, 0], ref[:, 1], 0.5, loss_type)
    assert abs(ours - theirs) <= 1e-5, (ours, theirs)
    assert ours > 0.05 and abs(ours - math.log(2)) > 1e-2   # not the trivial policy == reference case
    if metrics is not None:
        for key, trl_key in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                             ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")):
            assert abs(mine[key] - metrics[trl_key]) <= 1e-5, (key, mine[key], metrics[trl_key])


def test_orpo_first_step_loss_matches_trl(tiny_q4, pairs_dir, tmp_path):
    """ORPO: the odds-ratio term is TRL's ``odds_ratio_loss`` on our per-token mean log-probs;
    the NLL term is the mean over each chosen answer's tokens (TRL's also counts prompt tokens)."""
    torch = pytest.importorskip("torch")
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    adapter = write_adapter(tmp_path / "policy", tiny_q4, b_std=0.3, rank=4, alpha=8.0)
    model, ds, fns, _ = setup(tiny_q4, pairs_dir, {"method": "orpo", "preference.beta": 0.25}, adapter)
    b = collate_pairs(ds.train[:4])
    ours = fns.loss(b) / b.n_loss
    mine = fns.metrics("valid")
    seq = token_logps(model, b).sum(1).astype(np.float64)
    mean = seq / b.answer_tokens
    me = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, rc, rr, _, log_odds = orpo.ORPOTrainer.odds_ratio_loss(
        me, torch.tensor(mean[:4], dtype=torch.float32), torch.tensor(mean[4:], dtype=torch.float32))
    theirs = float(-mean[:4].mean() - losses.mean())
    assert abs(ours - theirs) <= 1e-5, (ours, theirs)
    assert abs(mine["rewards_chosen"] - float(rc.mean())) <= 1e-5
    assert abs(mine["reward_margin"] - float((rc - rr).mean())) <= 1e-5
    assert abs(mine["log_odds"] - float(log_odds)) <= 1e-5
    assert mine["reward_accuracy"] == float((rc > rr).float().mean())


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("kernels", ["cpu_fast_path", "plain_mlx"])
def test_fresh_adapter_dpo_is_ln2_with_zero_margin(tiny_q4, pairs_dir, tmp_path, monkeypatch, kernels):
    """Policy == reference before the first update: DPO loss ln 2 and margin 0, exactly (the
    reference pass runs the batches training runs, so the log-probs agree bit for bit). Also with
    the CPU kernels off: the path Metal/CUDA take (the head applied as a module, not dequantized)."""
    if kernels == "plain_mlx":
        from mlx_qlora.train.engines import mlx_cpu_kernels

        monkeypatch.setattr(mlx_cpu_kernels, "_ENABLED", [False])
    out = tmp_path / "run"
    s = train(config(tiny_q4, pairs_dir, out, steps=3, **{"optim.grad_accum": 2, "batch_size": 3}))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first_val, first = recs[0], recs[1]
    ln2 = float(np.float32(math.log(2)))
    assert first_val["step"] == 0 and first_val["val_loss"] == round(ln2, 6)
    assert first_val["val_reward_margin"] == 0.0 and first_val["val_rewards_chosen"] == 0.0
    assert first["step"] == 1 and first["train_loss"] == round(ln2, 6)
    assert first["reward_margin"] == 0.0 and first["rewards_rejected"] == 0.0 and first["reward_accuracy"] == 0.0
    # and it learns: the margin opens and the loss falls below ln 2
    assert recs[3]["reward_margin"] > 0.05 and s["val_loss"] < ln2 - 0.01, recs
    assert (out / "loss_curve.png").is_file() and s["steps"] == 3
    assert s["val_reward_margin"] == recs[-1]["val_reward_margin"] and "reward_accuracy" in s


def test_fresh_adapter_step_functions_exact(tiny_q4, pairs_dir):
    """The same at the step function on the first batch of epoch 0 (the reference pass's shapes)."""
    from mlx_qlora.train.data import batch_order

    model, ds, fns, _ = setup(tiny_q4, pairs_dir)
    first = batch_order([len(p.tokens) for p in ds.train], 4, 0, 0)[0]
    b = collate_pairs([ds.train[i] for i in first])
    loss, _ = fns.grad(b, (0, 0, 0))
    per_pair = np.float32(loss) / np.float32(4)
    assert per_pair == np.float32(math.log(2)), per_pair
    m = fns.metrics("train")
    assert m["reward_margin"] == 0.0 and m["rewards_chosen"] == 0.0 and m["rewards_rejected"] == 0.0


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_grad_accumulation_equals_one_batch(tiny_q4, pairs_dir, tmp_path, method):
    """Summed pair losses and gradients of 2 + 2 pairs = those of the 4 pairs in one batch."""
    adapter = write_adapter(tmp_path / "policy", tiny_q4, b_std=0.3, rank=4, alpha=8.0)
    _, ds, fns, _ = setup(tiny_q4, pairs_dir, {"method": method}, adapter)
    whole_loss, whole = fns.grad(collate_pairs(ds.train[:4]), (0, 0, 0))
    l1, g1 = fns.grad(collate_pairs(ds.train[:2]), (0, 0, 0))
    l2, g2 = fns.grad(collate_pairs(ds.train[2:4]), (0, 0, 0))
    parts = tree_map(mx.add, g1, g2)
    assert abs(whole_loss - (l1 + l2)) <= 1e-5 * abs(whole_loss)
    a, c = dict(tree_flatten(whole)), dict(tree_flatten(parts))
    scale = max(float(mx.abs(v).max()) for v in a.values())
    assert scale > 1e-3 and max(float(mx.abs(a[k] - c[k]).max()) for k in a) <= 1e-5 * scale


def weights(path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_resume_equals_uninterrupted(tiny_q4, pairs_dir, tmp_path, method):
    kw = {"method": method, "optim.grad_accum": 2, "batch_size": 3, "lora.dropout": 0.1}
    train(config(tiny_q4, pairs_dir, tmp_path / "full", steps=6, **kw))
    train(config(tiny_q4, pairs_dir, tmp_path / "half", steps=3, **kw))
    s = train(config(tiny_q4, pairs_dir, tmp_path / "half", steps=6, resume=True, **kw))
    assert s["steps"] == 6
    a, b = weights(tmp_path / "full" / "adapters.safetensors"), weights(tmp_path / "half" / "adapters.safetensors")
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    train(config(tiny_q4, pairs_dir, tmp_path / "other", steps=3, seed=1, **kw))   # the check can fail
    c = weights(tmp_path / "other" / "adapters.safetensors")
    assert max(np.abs(a[k] - c[k]).max() for k in a) > 1e-4


def test_init_adapter_is_the_reference(tiny_q4, pairs_dir, tmp_path):
    """From an SFT adapter: its rank/targets are used, the first step's loss is ln 2 (the policy
    starts as its reference) and training moves the adapter away from it."""
    sft = write_adapter(tmp_path / "sft", tiny_q4, b_std=0.2, rank=4, alpha=8.0)
    out = tmp_path / "dpo"
    train(config(tiny_q4, pairs_dir, out, steps=2, init_adapter=str(sft), **{"lora.rank": 16}))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[1]["train_loss"] == round(float(np.float32(math.log(2))), 6) and recs[1]["reward_margin"] == 0.0
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["rank"] == 4 and sorted(conf["target_modules"]) == sorted(json.loads(
        (sft / "adapter_config.json").read_text())["target_modules"])
    a, b = weights(sft / "adapters.safetensors"), weights(out / "adapters.safetensors")
    assert set(a) == set(b) and max(np.abs(a[k] - b[k]).max() for k in a) > 1e-4
    from mlx_qlora.train.adapter_files import read_adapter

    assert read_adapter(out).rank == 4   # the one reader fuse/export/chat/serve/eval use takes it


def test_reference_is_not_a_second_weight_copy(tmp_path_factory, pairs_dir, monkeypatch):
    """The reference pass swaps adapter weights only: the base is loaded once, its frozen arrays
    are the very same objects after the pass, and MLX's peak while it runs stays below one
    dequantized fp32 copy of the base (what a separate reference model would hold). The model is
    wide and the rows short, so weights, not activations, would dominate such a copy."""
    import tiny
    from mlx_qlora.train import loop

    wide = converted(tmp_path_factory, tiny.write_hf_dir(tmp_path_factory.mktemp("wide_hf"), hidden=256,
                                                         intermediate=1024, layers=4), "wide_q4", q_group_size=32)
    calls = []
    real_load = loop.load_base
    monkeypatch.setattr(loop, "load_base", lambda p: calls.append(p) or real_load(p))
    cfg = config(wide, pairs_dir, "unused")
    model, tok = loop.load_base(cfg.model)
    prepare_model(model)
    ds = load_pairs(cfg.data, tok, cfg.preference, cfg.seed)
    start = preference.start_adapter(model, cfg)
    frozen = {k: id(v) for k, v in tree_flatten(model.parameters()) if k not in start}
    fp32_copy = sum(m.weight.size * 32 // m.bits * 4 for _, m in model.named_modules() if hasattr(m, "bits"))
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    preference.make_step_fns(model, cfg, ds, start, dist.World(), say=lambda *_: None)
    grown = mx.get_peak_memory() - before
    assert calls == [cfg.model]
    assert {k: id(v) for k, v in tree_flatten(model.parameters()) if k not in start} == frozen
    assert all(p.ref is not None for p in ds.train + ds.valid)
    # measured here: 11.7 MB (the CPU path dequantizes a layer's weights per use) against 16.0 MB
    assert grown < fp32_copy, (grown, fp32_copy)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("row,needle", [
    ({"prompt": "q", "chosen": "a"}, "missing key 'rejected'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "word " * 400, "chosen": "a", "rejected": "b"}, "raise data.max_seq_len"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": "b"}, "both be strings or both be lists"),
])
def test_bad_pairs_are_one_line_exit_2(tiny_q4, tmp_path, row, needle):
    d = tmp_path / "data"
    d.mkdir()
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [good, good, row, good]))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["train", "-m", str(tiny_q4), "--data", str(d), "-o", str(out),
                                  "--method", "dpo", "--steps", "1", "--max_seq_len", "64", "--no-progress"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "train.jsonl line 3" in lines[0], r.output
    assert not out.exists()


def test_bad_preference_settings_are_one_line():
    for kw, needle in (({"method": "kto"}, "method='kto'"), ({"preference.beta": 0}, "preference.beta=0"),
                       ({"preference.loss_type": "ipo", "preference.label_smoothing": 0.1}, "sigmoid only"),
                       ({"method": "orpo", "preference.loss_type": "ipo"}, "apply to method dpo")):
        with pytest.raises(mlx_qlora.errors.UserError, match=needle.replace("(", r"\(")):
            load_config(None, {"model": "m", "data.train": "d", **kw})


# ------------------------------------------------------------------ data parallel
def test_two_ranks_equal_one_process(tiny_q4, pairs_dir, tmp_path):
    """DPO over 2 local ranks (batch 3: shares of 2 and 1 pairs; the reference pass split the same
    way and summed) trains the single-process losses, metrics and adapter."""
    from test_distributed import run_ranks

    kw = {"method": "dpo", "steps": 4, "eval_every": 2, "checkpoint_every": 0, "optim.learning_rate": 1e-2,
          "optim.schedule": "constant", "lora.rank": 4, "lora.alpha": 8.0}
    one = tmp_path / "one"
    train(config(tiny_q4, pairs_dir, one, batch_size=3, **kw))
    two = tmp_path / "two"
    run_ranks(tiny_q4, pairs_dir, two, **kw)

    def recs(out):
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    a, b = recs(one), recs(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 2, 3, 4, 4]
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_loss", "reward_margin", "rewards_chosen", "reward_accuracy", "val_reward_margin"):
            if k in ra:
                assert abs(ra[k] - rb[k]) <= 1e-4, (k, ra, rb)
    assert b[1]["reward_margin"] == 0.0 and b[1]["train_loss"] == round(float(np.float32(math.log(2))), 6)
    assert a[-2]["reward_margin"] > 0.05                     # it learned: the comparison is not vacuous
    wa, wb = weights(one / "adapters.safetensors"), weights(two / "adapters.safetensors")
    assert max(np.abs(wa[k] - wb[k]).max() for k in wa) <= 1e-4
