"""The world the documentation's code runs in (tests/test_docs.py): the docs name real Hub repos, as a user
writes them, and a loopback Hub (tests/test_hub.py's ``FakeHub``) serves tiny stand-ins under those names.

* ``facebook/opt-350m``: a tiny OPT (hidden 22, 2 layers, vocab 61) with a word-level tokenizer;
* ``ybelkada/opt-350m-lora``: a LoRA for it on q_proj / v_proj (r=8, alpha=16), in PEFT's layout, whose
  config names ``facebook/opt-350m`` as its base (task_type CAUSAL_LM);
* ``ybelkada/opt-350m-ia3``: an IA3 adapter for it;
* uploads: the token in ``HF_TOKEN`` may write to the namespace ``me`` (``af.push_to_hub(a, "me/...")``).

Nothing leaves the machine: ``HF_ENDPOINT`` points at 127.0.0.1, the HF cache is a temp folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import gen, tiny_opt

import adaptfn as af

MODEL_ID = "facebook/opt-350m"
ADAPTER_ID = "ybelkada/opt-350m-lora"
IA3_ID = "ybelkada/opt-350m-ia3"
WRITE_TOKEN = "hf_docs_write_token"
WORDS = ("hello world the a an is of to and in it that was for on are with as i his they be at one have this "
         "from or had by hot word but what some we can out other were all there when up use your how said each "
         "she which do their time if will way about many then them").split()


def tokenizer() -> Any:
    """A word-level fast tokenizer for the tiny OPT's 61 ids (OPT's specials: pad 1, bos = eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *WORDS][:61])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def build(tmp: Path) -> dict[str, dict[str, bytes]]:
    """The files of each stand-in repo."""
    model = tiny_opt()
    model.config._name_or_path = MODEL_ID
    model.save_pretrained(tmp / "opt")
    tokenizer().save_pretrained(tmp / "opt")
    fn, _ = af.functional(model)
    lora = af.init(fn, af.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                     task_type="CAUSAL_LM", base_model_name_or_path=MODEL_ID), generator=gen(1))
    lora = af.tree.map(lambda t: t * 0.3 if t.dim() else t, lora)  # a small, visible effect
    af.save(lora, tmp / "lora")
    ia3 = af.init(fn, af.IA3Config(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"],
                                   task_type="CAUSAL_LM", base_model_name_or_path=MODEL_ID))
    ia3 = af.tree.map(lambda t: t * 1.2 if t.dim() else t, ia3)
    af.save(ia3, tmp / "ia3")
    return {MODEL_ID: _folder_files(tmp / "opt"), ADAPTER_ID: _folder_files(tmp / "lora"),
            IA3_ID: _folder_files(tmp / "ia3")}


class World:
    """The loopback Hub with the repos of :func:`build`; :meth:`enter` points huggingface_hub at it (through a
    pytest ``monkeypatch``), :meth:`exit` stops it."""

    def __init__(self, tmp: Path, repos: dict[str, dict[str, bytes]]) -> None:
        from test_hub import FakeHub

        self.tmp = tmp
        self.hub = FakeHub()
        for repo, files in repos.items():
            self.hub.publish(repo, files)
        self.hub.writers[WRITE_TOKEN] = "me"

    def enter(self, monkeypatch: Any) -> None:
        from huggingface_hub import close_session, constants
        from test_hub import _online

        self.hub.start()
        _online(monkeypatch, self.hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)  # HF_TOKEN is used, as for a user
        monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.tmp / "hf-cache"))
        monkeypatch.setenv("HF_HUB_CACHE", str(self.tmp / "hf-cache"))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        monkeypatch.setenv("COLUMNS", "100")
        close_session()

    def exit(self) -> None:
        from huggingface_hub import close_session

        self.hub.stop()
        close_session()

