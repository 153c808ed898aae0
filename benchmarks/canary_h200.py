"""The canary's proof on a GPU with real SGLang (run by ``benchmarks/canary_h200.sh``; prints figures).

Sub-commands: ``build DATASET CACHE OUT`` (ensure_canary, timing, reference scores of corruptions and config
overrides), ``corrupt SRC DST KIND``, ``wait DEADLINE_S T0 PORT...``, ``eval PORT DATASET MODEL_DIR`` (MGSM-en
score and agreement with the reference), ``probe PORT`` (batch dependence), ``tiny OUT`` (random smoke model).
Needs torch, safetensors, tokenizers, requests and a GPU.
"""

import concurrent.futures as cf
import json
import os
import shutil
import sys
import time
from pathlib import Path

import requests


def build(ds, cache, out):
    from mlaprop.canary import ensure_canary

    t = time.monotonic()
    from mlaprop.canary import CanaryError, cached_path

    try:
        path = ensure_canary(ds, cache, log=lambda s: print(s, flush=True))
    except CanaryError as exc:
        print(f"BUILD REFUSED: {exc}; building anyway without the all-correct requirement", flush=True)
        from mlaprop.canary.build import build_canary
        from mlaprop.mgsm import load_dataset

        d = load_dataset(ds)
        path = cached_path(d.sha256, cache)
        build_canary(d, path, require_all=False, log=lambda s: print(s, flush=True))
    print(f"ensure_canary: {time.monotonic() - t:.1f} s -> {path}", flush=True)
    t = time.monotonic()
    ensure_canary(ds, cache)
    print(f"ensure_canary (cached): {time.monotonic() - t:.3f} s", flush=True)
    shutil.copy(path / "canary.json", Path(out) / "canary.json")
    Path("/tmp/canary_path").write_text(str(path))
    # corruption / override candidates, judged by the reference forward of the saved weights
    from tokenizers import Tokenizer

    from mlaprop.canary.checkpoint import fp8_linears, load_checkpoint
    from mlaprop.canary.data import examples
    from mlaprop.canary.model import CanaryLM
    from mlaprop.canary.train import greedy
    from mlaprop.mgsm import Parser, is_correct, load_dataset, parse_answer_simple_evals

    cfg = json.loads((path / "config.json").read_text())
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    items = load_dataset(ds).items
    exs = examples(items, tok, cfg["eos_token_id"])
    w = load_checkpoint(path, cfg)
    fp8 = set(fp8_linears(cfg))

    def score(weights, config):
        m = CanaryLM(config, weights).cuda().eval()
        res = greedy(m, [e.prompt_ids for e in exs], config["eos_token_id"], config["pad_token_id"])
        return sum(
            is_correct(Parser.SIMPLE_EVALS, it.target, parse_answer_simple_evals(tok.decode(ids)))
            for it, (ids, _) in zip(items, res, strict=False)
        )

    cand = {}
    for kind in CORRUPTIONS:
        cand[kind] = score(corrupted(w, fp8, cfg, kind), cfg)
        print("reference", kind, cand[kind], flush=True)
    for name, ov in (
        ("rope_theta_1e6", {"rope_theta": 1000000}),
        ("no_yarn", {"rope_scaling": None}),
        ("rms_eps_1e-2", {"rms_norm_eps": 1e-2}),
    ):
        c2 = dict(cfg)
        c2.update(ov)
        cand[name] = score(w, c2)
        print("reference", name, cand[name], flush=True)
    if os.environ.get("CANARY_LM_VARIANT") == "1":  # does a prompt LM loss make the canary see rope?
        from mlaprop.canary.build import build_canary
        from mlaprop.canary.train import TrainConfig

        t = time.monotonic()
        lm = build_canary(
            load_dataset(ds),
            Path("/tmp/canary_lm"),
            train_config=TrainConfig(lm_weight=1.0, time_limit_s=60),
            require_all=False,
            log=lambda s: print("lm variant:", s, flush=True),
        )
        cand["lm1_build_s"] = round(time.monotonic() - t, 1)
        cand["lm1_reference"] = lm.reference_correct
        wl = load_checkpoint(lm.path, cfg)
        for name, ov in (("rope_theta_1e6", {"rope_theta": 1000000}), ("no_yarn", {"rope_scaling": None})):
            c2 = dict(cfg)
            c2.update(ov)
            cand["lm1_" + name] = score(wl, c2)
            print("reference lm1", name, cand["lm1_" + name], flush=True)
    Path(out, "candidates.json").write_text(json.dumps(cand))


#: Scale corruptions, in the order tried: the first the reference forward puts below the gate is served.
CORRUPTIONS = (
    "scales_x4",
    "scales_checker_x2",
    "scales_checker_x8",
    "kv_b_scales_x4",
    "scales_ones",
    "scales_inverted",
)


def corrupt_scale(name, s, kind):
    """A corrupted weight_scale_inv tensor (``name`` is the weight's name)."""
    import torch

    if kind == "scales_x4":  # every scale off by 4 (RMSNorm absorbs most of it: measured 249/250)
        return s * 4
    if kind == "scales_checker_x2":  # alternate tiles off by 2
        i = torch.arange(s.shape[0])[:, None]
        j = torch.arange(s.shape[1])[None, :]
        return torch.where((i + j) % 2 == 1, s * 2, s)
    if kind == "scales_rolled":  # each tile reads its neighbour's scale (a block-indexing bug)
        return torch.roll(s, 1, dims=1 if s.shape[1] > 1 else 0)
    if kind == "scales_checker_x8":
        i = torch.arange(s.shape[0])[:, None]
        j = torch.arange(s.shape[1])[None, :]
        return torch.where((i + j) % 2 == 1, s * 8, s)
    if kind == "scales_ones":  # a loader that ignores weight_scale_inv
        return torch.ones_like(s)
    if kind == "scales_inverted":  # a loader that reads weight_scale_inv as 1 / scale
        return 1.0 / s
    if kind == "kv_b_scales_x4":
        return s * 4 if "kv_b_proj" in name else s
    raise ValueError(kind)


def corrupted(w, fp8, cfg, kind):
    """Dequantized weights as a loader would compute them from the corrupted scales."""
    from mlaprop.canary.fp8 import dequantize_block_fp8, quantize_block_fp8

    out = {}
    for k, v in w.items():
        if k in fp8:
            q, s = quantize_block_fp8(v)
            v = dequantize_block_fp8(q, corrupt_scale(k, s, kind))
        out[k] = v
    return out


def corrupt(src, dst, kind):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(str(Path(src) / "model.safetensors"))
    t = {
        k: (corrupt_scale(k[: -len("_scale_inv")], v, kind) if k.endswith("weight_scale_inv") else v)
        for k, v in t.items()
    }
    save_file(t, str(Path(dst) / "model.safetensors"), metadata={"format": "pt"})


def wait(ports, deadline_s, t0):
    t0 = float(t0)
    ready = {}
    while time.time() - t0 < deadline_s and len(ready) < len(ports):
        for p in ports:
            if p in ready:
                continue
            try:
                if requests.get(f"http://127.0.0.1:{p}/v1/models", timeout=2).status_code == 200:
                    ready[p] = round(time.time() - t0, 1)
                    print(f"port {p} ready after {ready[p]} s", flush=True)
            except requests.RequestException:
                pass
        time.sleep(1)
    return ready


def evaluate(port, ds, model_dir):
    from mlaprop.canary import compare_with_reference
    from mlaprop.mgsm import Parser, chat_request, is_correct, load_dataset, parse_answer_simple_evals

    url = f"http://127.0.0.1:{port}"
    model = requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    items = load_dataset(ds).items

    def one(it):
        r = requests.post(url + "/v1/chat/completions", json=chat_request(it, model), timeout=300)
        r.raise_for_status()
        text = r.json()["choices"][0]["message"]["content"] or ""
        return it, text

    t = time.monotonic()
    with cf.ThreadPoolExecutor(64) as ex:
        res = list(ex.map(one, items))
    secs = time.monotonic() - t
    answers = {it.qid: (text, parse_answer_simple_evals(text)) for it, text in res}
    correct = sum(is_correct(Parser.SIMPLE_EVALS, it.target, answers[it.qid][1]) for it, _ in res)
    agr = compare_with_reference(model_dir, answers)
    return {
        "score": correct / len(items),
        "correct": correct,
        "n": len(items),
        "eval_s": round(secs, 1),
        "ref_same_answer": agr.same_answer,
        "ref_same_text": agr.same_text,
        "ref_differing": list(agr.differing)[:20],
        "sample": [answers[it.qid][0] for it in items[:3]],
    }


def probe(port, n=32, tokens=64):
    url = f"http://127.0.0.1:{port}"
    prompts = [
        f"Question {i}: how many apples are there if each of {i + 2} people has {i * 3 + 1}? "
        for i in range(n)
    ]
    sp = {"temperature": 0, "max_new_tokens": tokens}

    def gen(t):
        j = requests.post(
            url + "/generate", json={"text": t, "sampling_params": sp, "return_logprob": True}, timeout=120
        ).json()
        return j["meta_info"]["output_token_logprobs"] if "meta_info" in j else j

    alone = [gen(p) for p in prompts[:6]]
    lst = requests.post(
        url + "/generate", json={"text": prompts, "sampling_params": sp, "return_logprob": True}, timeout=300
    ).json()
    with cf.ThreadPoolExecutor(n) as ex:
        conc = list(ex.map(gen, prompts))
    out = {"n": n, "tokens": tokens}
    for name, batch in (
        ("list", [x["meta_info"]["output_token_logprobs"] for x in lst]),
        ("concurrent", conc),
    ):
        diff, maxd = 0, 0.0
        for a, b in zip(alone, batch[:6], strict=False):
            ta, tb = [x[1] for x in a], [x[1] for x in b]
            if ta != tb:
                diff += 1
            for x, y in zip(a, b, strict=False):
                if x[1] != y[1]:
                    break
                maxd = max(maxd, abs(x[0] - y[0]))
        out[name] = {"prompts_differing": diff, "of": 6, "max_logprob_diff_before_divergence": maxd}
    return out


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "build":
        build(*sys.argv[2:5])
    elif cmd == "corrupt":
        corrupt(*sys.argv[2:5])
    elif cmd == "wait":
        print(json.dumps(wait([int(p) for p in sys.argv[4:]], float(sys.argv[2]), sys.argv[3])))
    elif cmd == "eval":
        print(json.dumps(evaluate(int(sys.argv[2]), sys.argv[3], sys.argv[4])))
    elif cmd == "probe":
        print(json.dumps(probe(int(sys.argv[2]))))
    elif cmd == "tiny":
        from mlaprop.tinymodel import write_tiny_mla

        print(write_tiny_mla(sys.argv[2], weights="random"))
