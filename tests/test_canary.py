"""The canary and the real-scale smoke weights on the CPU: block-FP8 round trip, checkpoint layout, the
plain-torch forward against transformers' DeepseekV2, the folder as transformers loads it, a few training
steps, the cache and the reference comparison. Skipped only when torch is absent (``tox -e canary`` has it)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from mlaprop.canary import (  # noqa: E402
    CanaryError,
    add_canary_parser,
    cached_path,
    canary_config,
    compare_with_reference,
    default_cache_dir,
    ensure_canary,
)
from mlaprop.canary.checkpoint import (  # noqa: E402
    CheckpointError,
    fp8_linears,
    load_checkpoint,
    param_shapes,
    random_weights,
    save_checkpoint,
)
from mlaprop.canary.fp8 import (  # noqa: E402
    E4M3_MAX,
    dequantize_block_fp8,
    fake_quant_weight,
    quantize_block_fp8,
    round_trip_bound,
)
from mlaprop.mgsm import load_dataset  # noqa: E402
from mlaprop.tinymodel import SmokeWeights, render_chat, write_tiny_mla  # noqa: E402

MGSM = (
    Path(os.environ.get("MLAPROP_SHARED") or Path(__file__).parents[1] / ".." / "shared")
    / "data/mgsm/mgsm_en.tsv"
)

#: A shrunken canary (CPU-sized) that still satisfies K <= 3 N and 128-wide activation groups.
SMALL = {
    "hidden_size": 128,
    "intermediate_size": 128,
    "moe_intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 4,
}


def small_config(vocab: int = 256) -> dict[str, Any]:
    return canary_config(vocab, overrides=SMALL)


# ----------------------------------------------------------------------------------------- block FP8


@pytest.mark.parametrize(
    ("n", "k", "scale"), [(128, 128, 1.0), (576, 1024, 0.03), (200, 300, 5e-3), (5, 7, 1e3)]
)
def test_block_fp8_round_trip_is_within_the_stated_bound(n: int, k: int, scale: float) -> None:
    """Every element comes back within 2**-4 |w| + 2**-10 s (its tile's scale), including partial tiles."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * scale
    q, s = quantize_block_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (-(-n // 128), -(-k // 128))
    err = (dequantize_block_fp8(q, s) - w).abs()
    assert bool((err <= round_trip_bound(w)).all())
    rel = float(err.norm() / w.norm())
    assert rel < 0.04, rel  # about 2.5 % in practice for Gaussian weights


def test_block_scales_are_amax_over_448_and_the_largest_element_is_exact() -> None:
    w = torch.zeros(256, 128)
    w[3, 5] = -7.0
    w[130, 1] = 0.5
    q, s = quantize_block_fp8(w)
    assert s[0, 0] == pytest.approx(7.0 / E4M3_MAX) and s[1, 0] == pytest.approx(0.5 / E4M3_MAX)
    assert float(q[3, 5].float()) == -E4M3_MAX
    assert float(dequantize_block_fp8(q, s)[130, 1]) == pytest.approx(0.5)


def test_fake_quant_is_idempotent_and_passes_gradients_straight_through() -> None:
    w = torch.randn(256, 384, requires_grad=True)
    fq = fake_quant_weight(w)
    q, s = quantize_block_fp8(fq.detach())
    assert torch.equal(dequantize_block_fp8(q, s), fq.detach())
    fq.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones_like(w))


def test_dequantize_refuses_a_scale_of_the_wrong_shape() -> None:
    q, s = quantize_block_fp8(torch.randn(256, 256))
    with pytest.raises(ValueError, match="does not fit"):
        dequantize_block_fp8(q, s[:1])


# ----------------------------------------------------------------------------------------- checkpoint


def test_checkpoint_layout_matches_sglangs_deepseek_fp8_loading(tmp_path: Path) -> None:
    """FP8 e4m3 + weight_scale_inv for every linear but the router and lm_head; bf16 for the rest."""
    from safetensors.torch import load_file

    cfg = canary_config()
    w = random_weights(cfg, seed=1)
    info = save_checkpoint(tmp_path, w, cfg)
    raw = load_file(str(tmp_path / "model.safetensors"))
    fp8 = set(fp8_linears(cfg))
    assert "lm_head.weight" not in fp8 and "model.layers.1.mlp.gate.weight" not in fp8
    assert "model.layers.0.self_attn.kv_b_proj.weight" in fp8
    for name in param_shapes(cfg):
        scale = name[: -len("weight")] + "weight_scale_inv"
        if name in fp8:
            assert raw[name].dtype == torch.float8_e4m3fn and raw[scale].dtype == torch.float32
        else:
            assert raw[name].dtype == torch.bfloat16 and scale not in raw
    assert info["tensors"] == len(raw) == len(param_shapes(cfg)) + len(fp8)
    back = load_checkpoint(tmp_path, cfg)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(back[name], fake_quant_weight(w[name]))


def test_checkpoint_refuses_an_fp8_gemm_with_k_over_3n() -> None:
    cfg = canary_config(overrides={"intermediate_size": 8192})  # down_proj K=8192 > 3 x 1024
    with pytest.raises(CheckpointError, match=r"down_proj.*K=8192 > 3 x N=1024"):
        fp8_linears(cfg)


def test_load_checkpoint_names_a_missing_tensor(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    cfg = small_config()
    save_file({"lm_head.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight"):
        load_checkpoint(tmp_path, cfg)


def test_random_smoke_weights_are_real_scale_unlike_the_dummy_loader(tmp_path: Path) -> None:
    """The random smoke model's FP8 weights are almost all non-zero with std ~ 1/sqrt(fan_in); the dummy
    loader's uniform(-1e-3, 1e-3) casts to zero for most of them."""
    path = write_tiny_mla(tmp_path / "tiny", weights=SmokeWeights.RANDOM, seed=3)
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    raw = load_file(str(path / "model.safetensors"))
    q = raw["model.layers.0.mlp.down_proj.weight"]
    assert float((q.float() != 0).float().mean()) > 0.95
    w = load_checkpoint(path, cfg)["model.layers.0.mlp.down_proj.weight"]
    assert float(w.std()) == pytest.approx(2048**-0.5, rel=0.05)
    dummy = (torch.rand(1024, 2048) * 2e-3 - 1e-3).to(torch.float8_e4m3fn)
    assert float((dummy.float() != 0).float().mean()) < 0.1
    assert not (tmp_path / "dummy" / "model.safetensors").exists()
    assert not (write_tiny_mla(tmp_path / "dummy") / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------- model


def test_forward_equals_transformers_deepseek_v2_on_the_same_weights() -> None:
    """The plain-torch forward is DeepseekV2's math: MLA with yarn rope, RMSNorm, SwiGLU MoE."""
    transformers = pytest.importorskip("transformers")
    from mlaprop.canary.model import CanaryLM

    cfg = canary_config(512, overrides={**SMALL, "moe_intermediate_size": 64, "intermediate_size": 256})
    w = random_weights(cfg, seed=2)
    ours = CanaryLM(cfg, w).eval()
    hf_cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**hf_cfg)).eval().float()
    state = {k: w[k] for k in hf.state_dict() if k in w}
    experts = int(cfg["n_routed_experts"])
    pre = "model.layers.1.mlp.experts."
    gate_up = torch.stack(
        [torch.cat([w[f"{pre}{e}.gate_proj.weight"], w[f"{pre}{e}.up_proj.weight"]]) for e in range(experts)]
    )
    down = torch.stack([w[f"{pre}{e}.down_proj.weight"] for e in range(experts)])
    ref = hf.state_dict()
    state[pre + "gate_up_proj"] = gate_up if ref[pre + "gate_up_proj"].shape == gate_up.shape else gate_up.mT
    state[pre + "down_proj"] = down if ref[pre + "down_proj"].shape == down.shape else down.mT
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())


# ----------------------------------------------------------------------------------------- data, folder


@pytest.fixture(scope="module")
def mgsm() -> Any:
    if not MGSM.is_file():
        pytest.skip(f"MGSM-en not at {MGSM} (set MLAPROP_SHARED)")
    return load_dataset(MGSM)


def test_written_folder_loads_in_transformers_and_tokenizes_as_the_trainer(tmp_path: Path, mgsm: Any) -> None:
    """config, tokenizer and chat template as the server reads them; the chat-templated prompt's ids are the
    training prompt's."""
    transformers = pytest.importorskip("transformers")
    from mlaprop.canary.data import corpus, examples
    from mlaprop.mgsm import build_prompt
    from mlaprop.tinymodel import _special_ids, train_tokenizer, write_model_folder

    items = mgsm.items[:20]
    tok = train_tokenizer(corpus(items), 1024)
    bos, eos, pad = _special_ids(tok)
    cfg = canary_config(tok.get_vocab_size(), bos=bos, eos=eos, pad=pad)
    write_model_folder(tmp_path, tok, cfg)
    save_checkpoint(tmp_path, random_weights(cfg), cfg)
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (
        hf_cfg.model_type == "deepseek_v2" and hf_cfg.kv_lora_rank == 512 and hf_cfg.num_attention_heads == 16
    )
    assert hf_cfg.quantization_config["weight_block_size"] == [128, 128]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    exs = examples(items, tok, eos)
    for item, ex in zip(items[:5], exs[:5], strict=True):
        messages = [{"role": "user", "content": build_prompt(item.question)}]
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == render_chat(build_prompt(item.question))
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tuple(ids) == ex.prompt_ids
        assert hf_tok.decode(list(ex.answer_ids[:-1])) == f" Answer: {item.target_value}"
        assert ex.answer_ids[-1] == hf_tok.eos_token_id


def test_a_few_training_steps_on_the_cpu_lower_the_loss_and_the_build_writes_a_checked_folder(
    tmp_path: Path, mgsm: Any
) -> None:
    from mlaprop.canary.build import build_canary
    from mlaprop.canary.train import TrainConfig

    ds = dataclasses.replace(mgsm, items=mgsm.items[:2])
    tc = TrainConfig(max_steps=12, check_every=4, lr=3e-3, warmup=2)
    res = build_canary(
        ds, tmp_path / "c", device="cpu", train_config=tc, config_overrides=SMALL, require_all=False
    )
    meta = json.loads((res.path / "canary.json").read_text())
    history = meta["train"]["history"]
    assert history[-1][1] < history[0][1] * 0.7, history  # loss fell
    assert [q["qid"] for q in meta["questions"]] == ["mgsm_en_000", "mgsm_en_001"]
    assert {"reference", "extracted", "margin", "correct"} <= set(meta["questions"][0])
    assert res.bytes == (res.path / "model.safetensors").stat().st_size > 0
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (res.path / name).is_file()


def test_build_refuses_a_model_whose_reference_misses_questions(tmp_path: Path, mgsm: Any) -> None:
    from mlaprop.canary.build import build_canary
    from mlaprop.canary.train import TrainConfig

    ds = dataclasses.replace(mgsm, items=mgsm.items[:2])
    with pytest.raises(CanaryError, match="answers 0/2 questions"):
        build_canary(
            ds, tmp_path / "c", device="cpu", train_config=TrainConfig(max_steps=1), config_overrides=SMALL
        )
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------------------- cache, CLI


def test_ensure_canary_returns_the_cached_folder_without_training(tmp_path: Path, mgsm: Any) -> None:
    path = cached_path(mgsm.sha256, tmp_path)
    assert path.parent == tmp_path and len(path.name) == 16
    path.mkdir()
    (path / "canary.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"x")
    assert ensure_canary(MGSM, tmp_path) == path
    other = dataclasses.replace(mgsm, sha256="0" * 64)
    assert cached_path(other.sha256, tmp_path) != path


def test_ensure_canary_without_a_gpu_says_how_to_build(tmp_path: Path, mgsm: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CanaryError, match="needs a GPU"):
        ensure_canary(MGSM, tmp_path)


def test_default_cache_dir_follows_xdg() -> None:
    assert default_cache_dir({"XDG_CACHE_HOME": "/x/c"}) == Path("/x/c/mlaprop/canary")
    assert default_cache_dir({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == Path("/h/.cache/mlaprop/canary")


def test_cli_parser_reads_canary_build() -> None:
    parser = argparse.ArgumentParser(prog="mlaprop")
    add_canary_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["canary", "build", "--dataset", "d.tsv", "--device", "cpu", "--force"])
    assert (args.dataset, args.device, args.force, args.json) == ("d.tsv", "cpu", True, False)
    assert callable(args.func)


def test_compare_with_reference_counts_agreement(tmp_path: Path) -> None:
    rows = [
        {"qid": "q0", "reference": " Answer: 18", "extracted": "18"},
        {"qid": "q1", "reference": " Answer: 3", "extracted": "3"},
        {"qid": "q2", "reference": " Answer: 7", "extracted": "7"},
    ]
    (tmp_path / "canary.json").write_text(json.dumps({"questions": rows}))
    agr = compare_with_reference(
        tmp_path,
        {"q0": ("Answer: 18", "18"), "q1": (" Answer: 4", "4"), "q2": (" Answer: 7", "7"), "zz": ("", "")},
    )
    assert (agr.total, agr.same_answer, agr.same_text, agr.differing) == (3, 2, 2, ("q1",))
    assert agr.rate == pytest.approx(2 / 3)
    with pytest.raises(CanaryError, match="not a canary"):
        compare_with_reference(tmp_path / "nope", {})


def test_cli_build_without_a_gpu_exits_2_and_says_why(
    tmp_path: Path, mgsm: Any, monkeypatch: Any, capsys: Any
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parser = argparse.ArgumentParser(prog="mlaprop")
    add_canary_parser(parser.add_subparsers(dest="command"), "help")
    args = parser.parse_args(["canary", "build", "--dataset", str(MGSM), "--cache-dir", str(tmp_path)])
    assert args.func(args, {}) == 2
    assert "needs a GPU" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n")
    args = parser.parse_args(["canary", "build", "--dataset", str(bad), "--cache-dir", str(tmp_path)])
    assert args.func(args, {}) == 2
    assert "InvalidDataset" in capsys.readouterr().err
