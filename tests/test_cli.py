"""The ``adaptfn`` command line (adaptfn/cli.py): every subcommand in-process (``main(argv)``, exit status
returned) and as a subprocess (``python -m adaptfn`` and the ``[project.scripts]`` entry point), on tiny
transformers models saved to temp folders; bad input (missing folder, corrupt file, wrong base model,
unsupported formats) exits 2 with one message and no traceback; usage errors exit 1.

``merge`` is also measured, in a subprocess on a ~67 MiB model: its peak RSS while merging and saving
stays under half a model above the RSS with the model loaded (layer by layer, never two copies)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import gen, ids_for, tiny_llama, tiny_opt

import adaptfn as af
from adaptfn.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """base/ (a tiny OPT), llama/ (a wrong base), a/ (LoRA on q/v + lm_head, an unknown config field),
    b/ (LoRA on q/fc1, r=2), ia3/, corrupt/ (truncated weights), kohya.safetensors."""
    d = tmp_path_factory.mktemp("cli")
    model = tiny_opt()
    model.save_pretrained(d / "base")
    tiny_llama().save_pretrained(d / "llama")
    fn, _ = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                  init_lora_weights=False, base_model_name_or_path=str(d / "base"),
                                  task_type="CAUSAL_LM"), generator=gen(1))
    af.save(a, d / "a")
    cfg = json.loads((d / "a" / "adapter_config.json").read_text())
    cfg["future_field"] = {"x": 1}
    (d / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    b = af.init(fn, af.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "fc1"], init_lora_weights=False),
                generator=gen(2))
    af.save(b, d / "b")
    q = af.select(a, lambda p: "proj" in p)  # a's deltas only: what af.combine takes (no modules_to_save)
    af.save(q, d / "q")
    ia3 = af.init(fn, af.IA3Config(target_modules=["v_proj", "fc2"], feedforward_modules=["fc2"]))
    ia3 = af.tree.map(lambda t: t * 1.5 if t.dim() else t, ia3)
    af.save(ia3, d / "ia3")
    af.save(a, d / "corrupt")
    w = d / "corrupt" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 4)}, d / "kohya.safetensors")
    return {"dir": d, "model": model, "a": af.load(d / "a"), "b": b, "q": q, "ia3": ia3}


def run(capsys, *argv):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    rc = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- inspect ---------------------------------------------------------------------------------------------
def test_inspect_text_and_json(work, capsys):
    d = work["dir"]
    rc, out, err = run(capsys, "inspect", d / "a")
    assert rc == 0 and err == ""
    for s in ("LoRA adapter", "peft_type LORA", "q_proj", "v_proj", "lm_head.weight", "replacement", "future_field",
              "adapter_model.safetensors", str(d / "base")):
        assert s in out, s
    rc, out, _ = run(capsys, "inspect", d / "a", "--json")
    info = json.loads(out)
    a = work["a"]
    assert info["method"] == "lora" and info["base_model"] == str(d / "base") and info["task_type"] == "CAUSAL_LM"
    groups = {(t["kind"], t["module"]): t for t in info["targets"]}
    assert groups[("linear", "q_proj")]["count"] == 2 and groups[("linear", "q_proj")]["ranks"] == [4]
    assert groups[("linear", "q_proj")]["alphas"] == [8] and groups[("linear", "q_proj")]["in_out"] == ["22->22"]
    assert groups[("replacement", "lm_head.weight")]["in_out"] == ["61x22"]
    assert info["parameters"] == a.num_parameters() and info["dtypes"] == {"float32": a.num_parameters()}
    sizes = {f: os.path.getsize(d / "a" / f) for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert info["files"] == sizes and info["size_on_disk"] == sum(sizes.values())
    assert info["unknown_config_fields"] == {"future_field": {"x": 1}}


def test_inspect_ia3_and_adalora(work, capsys, tmp_path):
    rc, out, _ = run(capsys, "inspect", work["dir"] / "ia3", "--json")
    kinds = {t["module"]: t["kind"] for t in json.loads(out)["targets"]}
    assert rc == 0 and json.loads(out)["method"] == "ia3" and set(kinds) == {"v_proj", "fc2"}
    assert kinds["v_proj"] != kinds["fc2"]  # output vector vs feedforward (input) vector
    fn, _ = af.functional(work["model"])
    ada = af.init(fn, af.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=16, target_modules=["q_proj"], total_step=10),
                  generator=gen(3))
    af.save(ada, tmp_path / "ada")
    rc, out, _ = run(capsys, "inspect", tmp_path / "ada", "--json")
    t = json.loads(out)["targets"][0]
    assert rc == 0 and json.loads(out)["method"] == "adalora" and t["ranks"] == [4] and t["alphas"] == [16]
    rc, out, _ = run(capsys, "diff", tmp_path / "ada", tmp_path / "ada", "--json")
    assert rc == 0 and json.loads(out)["identical"]


def test_inspect_from_the_hub_with_revision_subfolder_token(work, capsys, monkeypatch, tmp_path):
    from huggingface_hub import close_session, constants
    from test_hub import FakeHub, _online, files_of, under

    hub = FakeHub()
    hub.start()
    try:
        _online(monkeypatch, hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        hub.publish("user/repo", under("sub", files_of(work["b"], tmp_path, "b")), refs=("main",), token="hf_r")
        hub.publish("user/repo", under("sub", files_of(work["a"], tmp_path, "a")), refs=("v1",))
        rc, out, err = run(capsys, "inspect", "user/repo", "--subfolder", "sub", "--token", "hf_wrong")
        assert rc == 2 and "user/repo" in err and "Traceback" not in err and out == ""
        rc, out, _ = run(capsys, "inspect", "user/repo", "--revision", "v1", "--subfolder", "sub", "--token", "hf_r",
                         "--json")
        assert rc == 0 and json.loads(out)["parameters"] == work["a"].num_parameters()
        rc, out, _ = run(capsys, "inspect", "user/repo", "--subfolder", "sub", "--token", "hf_r", "--json")
        assert rc == 0 and json.loads(out)["parameters"] == work["b"].num_parameters()
        rc, _, err = run(capsys, "diff", "user/repo", "user/repo", "--revision", "v1", "--subfolder", "sub",
                         "--token", "hf_r", "--json")
        assert rc == 0
    finally:
        hub.stop()
        close_session()


# -- diff ------------------------------------------------------------------------------------------------
def test_diff(work, capsys, tmp_path):
    d = work["dir"]
    rc, out, _ = run(capsys, "diff", d / "a", d / "a", "--json")
    assert rc == 0 and json.loads(out)["identical"] is True
    rc, out, _ = run(capsys, "diff", d / "a", d / "b", "--json")
    res = json.loads(out)
    assert rc == 0 and res["identical"] is False
    assert res["config"]["r"] == {"a": 4, "b": 2} and "future_field" in res["config"]
    assert set(res["only_in_a"]) == {"lm_head", *(f"model.decoder.layers.{i}.self_attn.v_proj" for i in (0, 1))}
    assert set(res["only_in_b"]) == {f"model.decoder.layers.{i}.fc1" for i in (0, 1)}
    q = "model.decoder.layers.0.self_attn.q_proj"
    m = res["modules"][q]
    assert m["shapes"]["a"]["lora_A"] == [4, 22] and m["shapes"]["b"]["lora_A"] == [2, 22]
    a, b = work["a"], work["b"]

    def delta(x):
        lv = x.leaves(q)
        return x.entries[q].scaling * lv["lora_B"] @ lv["lora_A"]

    assert m["delta_diff_norm"] == pytest.approx(float((delta(a) - delta(b)).norm()), rel=1e-5)
    rc, out, _ = run(capsys, "diff", d / "a", d / "b")
    assert rc == 0 and "modules only in A" in out and "r" in out and q.rsplit(".", 1)[0][:10] in out
    # the same adapter with one module changed: only that module is reported
    changed = af.tree.map(lambda t: t, a)
    leaves = dict(changed.tensors)
    leaves[q] = {**leaves[q], "lora_B": leaves[q]["lora_B"] * 2}
    from adaptfn.adapter import replace

    af.save(replace(a, tensors=leaves), tmp_path / "a2")
    rc, out, _ = run(capsys, "diff", d / "a", tmp_path / "a2", "--json")
    res = json.loads(out)
    assert list(res["modules"]) == [q] and res["modules"][q]["delta_rel_diff"] == pytest.approx(0.5, rel=1e-5)
    rc, out, _ = run(capsys, "diff", d / "ia3", d / "ia3", "--json")
    assert rc == 0 and json.loads(out)["identical"]


# -- merge -----------------------------------------------------------------------------------------------
def test_merge_writes_a_transformers_checkpoint(work, capsys, tmp_path):
    from transformers import OPTForCausalLM

    d = work["dir"]
    rc, out, err = run(capsys, "merge", d / "a", "--out", tmp_path / "merged", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["safetensors_files"] == ["model.safetensors"] and res["modules"] == len(work["a"].paths)
    assert res["untied"] == 1  # lm_head is replaced (modules_to_save): untied from embed_tokens
    merged = OPTForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.tie_word_embeddings is False
    fn, params = af.functional(work["model"])
    ids = ids_for(work["model"])
    with torch.no_grad():
        want = af.inject(fn, work["a"])(params, input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the base model named explicitly, a text summary with the progress bar on stderr
    rc, out, err = run(capsys, "merge", d / "b", "--base", d / "base", "--out", tmp_path / "merged_b")
    assert rc == 0 and "merged 4 modules" in out and "merging" in err
    merged_b = OPTForCausalLM.from_pretrained(tmp_path / "merged_b").eval()
    assert merged_b.config.tie_word_embeddings is True  # nothing untied
    with torch.no_grad():
        torch.testing.assert_close(merged_b(input_ids=ids).logits,
                                   af.inject(fn, work["b"])(params, input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_bad_input(work, capsys, tmp_path):
    d = work["dir"]
    rc, out, err = run(capsys, "merge", d / "a", "--base", d / "llama", "--out", tmp_path / "x")
    assert rc == 2 and "IncompatibleAdapterError" in err and "[67, 24]" in err and not (tmp_path / "x").exists()
    assert err.count("\n") == 1
    rc, _, err = run(capsys, "merge", d / "a", "--base", d / "no-such-model", "--out", tmp_path / "x")
    assert rc == 2 and "cannot load the base model" in err and "Traceback" not in err
    rc, _, err = run(capsys, "merge", d / "b", "--out", tmp_path / "x")  # b names no base model
    assert rc == 1 and "--base is required" in err
    rc, _, err = run(capsys, "merge", d / "a")
    assert rc == 1 and "--out" in err


# -- combine ---------------------------------------------------------------------------------------------
def test_combine(work, capsys, tmp_path):
    d = work["dir"]
    rc, out, err = run(capsys, "combine", d / "q", d / "b", "--weights", "0.7", "0.3", "--how", "cat",
                       "--out", tmp_path / "c", "--json")
    assert rc == 0, err
    want = af.combine([work["q"], work["b"]], [0.7, 0.3], how="cat")
    got = af.load(tmp_path / "c")
    assert got.paths == want.paths and json.loads(out)["modules"] == len(want.paths)
    assert all(torch.equal(got.leaves(p)[k], want.leaves(p)[k]) for p in want.paths for k in ("lora_A", "lora_B"))
    rc, _, err = run(capsys, "combine", d / "a", d / "b", "--weights", "1", "1", "--out", tmp_path / "c4")
    assert rc == 2 and "IncompatibleAdapterError" in err and "lm_head" in err and not (tmp_path / "c4").exists()


def test_combine_passes_the_contract_arguments(work, capsys, tmp_path, monkeypatch):
    """The plumbing against af.combine's contract signature (docs/design.md 1b), with a stand-in."""
    calls = []

    def fake_combine(adapters, weights, how="cat", density=None, majority_sign_method="total", svd_rank=None,
                     svd_clamp=None, svd_full_matrices=True, svd_driver=None, generator=None):
        calls.append(dict(adapters=adapters, weights=weights, how=how, density=density,
                          majority_sign_method=majority_sign_method, svd_rank=svd_rank, svd_clamp=svd_clamp,
                          svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, generator=generator))
        return adapters[0]

    monkeypatch.setattr(af, "combine", fake_combine, raising=False)
    d = work["dir"]
    rc, out, err = run(capsys, "combine", d / "a", d / "b", "--weights", "0.7", "0.3", "--how", "ties", "--density",
                       "0.5", "--majority-sign-method", "frequency", "--svd-rank", "3", "--svd-economic", "--seed",
                       "7", "--out", tmp_path / "c")
    assert rc == 0, err
    c = calls[0]
    assert c["weights"] == [0.7, 0.3] and c["how"] == "ties" and c["density"] == 0.5 and c["svd_rank"] == 3
    assert c["majority_sign_method"] == "frequency" and c["svd_full_matrices"] is False
    assert isinstance(c["generator"], torch.Generator) and c["generator"].initial_seed() == 7
    assert [x.paths for x in c["adapters"]] == [work["a"].paths, work["b"].paths]
    assert af.load(tmp_path / "c").paths == work["a"].paths and "combined 2 adapters" in out
    rc, _, err = run(capsys, "combine", d / "a", d / "b", "--weights", "1", "--out", tmp_path / "c2")
    assert rc == 1 and "one weight per adapter" in err

    def refusing(*args, **kwargs):
        raise af.ConfigError("combine: how='svd' is not supported for ia3 adapters")

    monkeypatch.setattr(af, "combine", refusing)
    rc, _, err = run(capsys, "combine", d / "a", d / "b", "--weights", "1", "1", "--how", "svd", "--out",
                     tmp_path / "c3")
    assert rc == 2 and "ConfigError" in err and "ia3" in err


# -- convert ---------------------------------------------------------------------------------------------
def test_convert(work, capsys, tmp_path):
    d = work["dir"]
    rc, out, err = run(capsys, "convert", d / "a", "--to", "peft", "--out", tmp_path / "canon")
    assert rc == 0, err
    af.save(work["a"], tmp_path / "direct")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "canon" / f).read_bytes() == (tmp_path / "direct" / f).read_bytes()
    rc, _, err = run(capsys, "convert", d / "a", "--to", "kohya", "--out", tmp_path / "k")
    assert rc == 2 and "kohya" in err and "supported: --from peft" in err and not (tmp_path / "k").exists()
    rc, _, err = run(capsys, "convert", d / "kohya.safetensors", "--to", "peft", "--out", tmp_path / "k")
    assert rc == 2 and "kohya / A1111" in err and "not supported yet" in err
    rc, _, err = run(capsys, "convert", d / "a", "--from", "a1111", "--to", "peft", "--out", tmp_path / "k")
    assert rc == 2 and "a1111" in err
    rc, _, err = run(capsys, "convert", d / "a", "--to", "peft", "--out", d / "a")
    assert rc == 2 and "source folder" in err


# -- verify ----------------------------------------------------------------------------------------------
def test_verify(work, capsys, monkeypatch):
    import peft

    d = work["dir"]
    rc, out, err = run(capsys, "verify", d / "a", "--json", "--samples", "2", "--seq-len", "5")
    assert rc == 0, err
    res = json.loads(out)
    checks = {c["check"]: c for c in res["checks"]}
    assert checks["adaptfn vs PEFT"]["max_rel_err"] <= 1e-5 and checks["adaptfn vs PEFT"]["ok"]
    assert checks["adaptfn merged vs unmerged"]["max_rel_err"] <= 1e-5 and res["adapter_effect_rel"] > 1e-3
    # PEFT loading something else: a real mismatch, exit 3
    real = peft.PeftModel.from_pretrained
    monkeypatch.setattr(peft.PeftModel, "from_pretrained",
                        lambda model, _src, **kw: real(model, str(d / "b"), **kw))
    rc, out, err = run(capsys, "verify", d / "a", "--samples", "2", "--seq-len", "5")
    assert rc == 3 and "NO" in out and "above the tolerance" in err
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", real)
    rc, out, _ = run(capsys, "verify", d / "b", "--base", d / "base", "--no-peft", "--json")
    assert rc == 0 and [c["check"] for c in json.loads(out)["checks"]] == ["adaptfn merged vs unmerged"]


def test_verify_bad_input(work, capsys):
    d = work["dir"]
    rc, _, err = run(capsys, "verify", d / "a", "--base", d / "llama")
    assert rc == 2 and ("q_proj" in err or "PEFT could not load" in err) and "Traceback" not in err
    rc, _, err = run(capsys, "verify", d / "a", "--tol", "-1")
    assert rc == 1 and "--tol" in err


# -- bad input and usage, every subcommand ------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["inspect", "{missing}"], ["diff", "{a}", "{missing}"], ["merge", "{missing}", "--base", "{base}", "--out", "o"],
    ["combine", "{missing}", "{a}", "--weights", "1", "1", "--out", "o"], ["convert", "{missing}", "--to", "peft",
                                                                             "--out", "o"],
    ["verify", "{missing}", "--base", "{base}"],
    ["inspect", "{corrupt}"], ["diff", "{corrupt}", "{a}"], ["merge", "{corrupt}", "--base", "{base}", "--out", "o"],
    ["convert", "{corrupt}", "--to", "peft", "--out", "o"], ["verify", "{corrupt}", "--base", "{base}"],
], ids=lambda a: " ".join(a))
def test_bad_input_exits_2_with_one_message(work, capsys, argv, monkeypatch, tmp_path):
    d = work["dir"]
    monkeypatch.chdir(tmp_path)
    if argv[0] == "combine":
        monkeypatch.setattr(af, "combine", lambda adapters, weights, **kw: adapters[0], raising=False)
    names = {"missing": d / "nope", "a": d / "a", "base": d / "base", "corrupt": d / "corrupt"}
    rc, out, err = run(capsys, *[x.format(**names) for x in argv])
    assert rc == 2
    assert err.startswith(f"adaptfn {argv[0]}: error") and err.count("\n") == 1 and "Traceback" not in err
    assert ("corrupt" in err and "adapter_model.safetensors" in err) if "corrupt" in argv[1] + argv[-1] else True
    assert not (tmp_path / "o").exists()


def test_usage_errors_exit_1(capsys):
    for argv in ([], ["frobnicate"], ["inspect"], ["inspect", "x", "--no-such-flag"], ["diff", "x"],
                 ["verify", "x", "--samples", "0"]):
        rc, out, err = run(capsys, *argv)
        assert rc == 1, argv
        assert "usage:" in err and "Traceback" not in err
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "inspect" in out and "exit status" in out
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"adaptfn {af.__version__}"


# -- as subprocesses ------------------------------------------------------------------------------------
def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="120", OMP_NUM_THREADS="1")
    return env


def _spawn(cmd, cwd):
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_entry_point_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert [line.strip() for line in section.strip().splitlines()] == ['adaptfn = "adaptfn.cli:main"']


def _big_model(folder):
    """An OPT of ~67 MiB (hidden 384, 8 layers, vocab 8192) and a LoRA on every linear of its blocks."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=8192, hidden_size=384, num_hidden_layers=8, ffn_dim=1536, num_attention_heads=6,
                    max_position_embeddings=128, word_embed_proj_dim=384)
    model = OPTForCausalLM(cfg)
    model.save_pretrained(folder / "big")
    fn, _ = af.functional(model)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    adapter = af.init(fn, af.LoraConfig(r=8, target_modules=targets, init_lora_weights=False), generator=gen(0))
    af.save(adapter, folder / "big-lora")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_every_subcommand_as_a_subprocess(work, tmp_path):
    """``python -m adaptfn`` for each subcommand, and the console-script entry point (``adaptfn.cli:main``
    run the way pip's generated script runs it; the installed ``adaptfn`` script itself when this
    environment has one), concurrently. ``merge`` runs on a ~67 MiB model and reports its memory: the
    peak RSS while merging and saving (sharded) stays under half a model above the RSS with the model
    loaded: layer by layer, never a second copy of the model."""
    d = work["dir"]
    model_bytes = _big_model(tmp_path)
    py = [sys.executable, "-m", "adaptfn"]
    entry = [sys.executable, "-c", "import sys; from adaptfn.cli import main; sys.exit(main())"]
    jobs = {
        "inspect": (py + ["inspect", str(d / "a"), "--json"], 0),
        "diff": (entry + ["diff", str(d / "a"), str(d / "b")], 0),
        "merge": (py + ["merge", str(tmp_path / "big-lora"), "--base", str(tmp_path / "big"), "--out",
                        str(tmp_path / "m"), "--max-shard-size", "10MB", "--json"], 0),
        "combine": (py + ["combine", str(d / "q"), str(d / "b"), "--weights", "1", "1", "--out", str(tmp_path / "c")],
                    0),
        "convert": (entry + ["convert", str(d / "a"), "--to", "peft", "--out", str(tmp_path / "p")], 0),
        "verify": (py + ["verify", str(d / "corrupt"), "--base", str(d / "base")], 2),
    }
    script = Path(sys.executable).parent / "adaptfn"
    if script.is_file():  # an environment where adaptfn is pip-installed (./scripts/test's .venv)
        jobs["script"] = ([str(script), "verify", str(d / "a"), "--json", "--samples", "2", "--seq-len", "4"], 0)
    else:
        jobs["verify-ok"] = (py + ["verify", str(d / "a"), "--json", "--samples", "2", "--seq-len", "4"], 0)
    procs = {k: _spawn(cmd, tmp_path) for k, (cmd, _) in jobs.items()}
    results = {k: (p.wait(timeout=300), *p.communicate()) for k, p in procs.items()}
    for k, (rc, out, err) in results.items():
        assert rc == jobs[k][1], f"{k}: rc={rc}\n{out}\n{err}"
        assert "Traceback" not in err, f"{k}: {err}"
    assert json.loads(results["inspect"][1])["method"] == "lora"
    assert "modules only in A" in results["diff"][1]
    assert af.load(tmp_path / "p").paths == work["a"].paths
    assert results["verify"][2].startswith("adaptfn verify: error") and "corrupt" in results["verify"][2]
    ok = json.loads(results["script" if "script" in results else "verify-ok"][1])
    assert ok["ok"] and [c["check"] for c in ok["checks"]] == ["adaptfn merged vs unmerged", "adaptfn vs PEFT"]
    merged = json.loads(results["merge"][1])
    assert len(merged["safetensors_files"]) > 1  # sharded as asked
    if merged["rss_before_merge_bytes"] is not None:  # Linux: /proc/self/clear_refs resets the peak
        extra = merged["peak_rss_merge_and_save_bytes"] - merged["rss_before_merge_bytes"]
        print(f"merge: model {model_bytes / 2**20:.1f} MiB; RSS {merged['rss_before_merge_bytes'] / 2**20:.1f} MiB "
              f"loaded, peak {merged['peak_rss_merge_and_save_bytes'] / 2**20:.1f} MiB merging + saving "
              f"(+{extra / 2**20:.1f} MiB); process peak {merged['peak_rss_bytes'] / 2**20:.1f} MiB")
        assert extra < 0.5 * model_bytes, (extra, model_bytes)
