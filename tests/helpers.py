"""Helpers shared by the tests: free loopback ports, random LoRA adapters that change a tiny
model's answers, and an oracle that answers one request at a time with plain transformers + PEFT."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_adapter(
    base_dir: Path,
    out_dir: Path,
    seed: int,
    rank: int = 8,
    std: float = 0.3,
    targets: list[str] | str = QKVO,
    **lora_options,
) -> Path:
    """A LoRA adapter with large random A and B weights, so that it dominates the answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    options = dict(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(model, LoraConfig(**{**options, **lora_options}))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, std)
    peft_model.save_pretrained(out_dir)
    return out_dir


class Oracle:
    """Plain transformers/PEFT greedy generation, one request at a time (what the seeds do)."""

    def __init__(self, base_dir: Path):
        from transformers import AutoTokenizer

        self.base_dir = base_dir
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.models: dict[str | None, object] = {}
        self.answers: dict[tuple, str] = {}
        self.lock = threading.Lock()

    def model(self, adapter_dir: Path | None):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        key = str(adapter_dir) if adapter_dir else None
        if key not in self.models:
            model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)
            if adapter_dir is not None:
                model = PeftModel.from_pretrained(model, adapter_dir)
            self.models[key] = model.eval()
        return self.models[key]

    def prompt_ids(self, text: str, chat: bool) -> list[int]:
        if chat:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text)["input_ids"]

    def answer_ids(self, adapter_dir: Path | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
        """Greedy new token ids up to (not including) the end of turn."""
        import torch

        model = self.model(adapter_dir)
        ids = torch.tensor([prompt_ids])
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        for position, token in enumerate(new):
            if token in eos:
                return new[:position]
        return new

    def answer(self, adapter_dir: Path | None, text: str, max_tokens: int, chat: bool = True) -> str:
        key = (str(adapter_dir), text, max_tokens, chat)
        with self.lock:
            if key not in self.answers:
                new = self.answer_ids(adapter_dir, self.prompt_ids(text, chat), max_tokens)
                self.answers[key] = self.tokenizer.decode(new, skip_special_tokens=True)
            return self.answers[key]


def drifting_notes(count: int, *, id_of=lambda i, rng: f"notes.jsonl:{i + 1:04d}", seed: int = 3) -> dict[str, str]:
    """Row id -> text: copies of 12 templated notes, each copy with up to 4 words changed, so
    some copies stay near their template and some drift away (near-dedupe's chains)."""
    import random

    rng = random.Random(seed)
    words = [
        "patient",
        "reports",
        "chest",
        "pain",
        "fever",
        "cough",
        "since",
        "monday",
        "with",
        "nausea",
        "and",
        "mild",
        "headache",
        "today",
    ]
    base = [" ".join(rng.choices(words, k=30)) for _ in range(12)]
    texts = {}
    for i in range(count):
        source = base[i % len(base)].split()
        for _ in range(rng.randint(0, 4)):
            source[rng.randrange(len(source))] = rng.choice(words)
        texts[id_of(i, rng)] = " ".join(source)
    return texts


def near_duplicates_sequentially(texts: dict[str, str], threshold: float) -> set[str]:
    """The reference: one datasketch MinHashLSH index fed every row in row-id order."""
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from ray_jobs.preprocess.clean import _SIGNATURE_SCHEME, minhash_signature

    lsh, kept, rejected = MinHashLSH(threshold=threshold, num_perm=64), {}, set()
    for row_id in sorted(texts):
        signature = minhash_signature(texts[row_id])
        minhash = MinHash(num_perm=64, hashvalues=signature, scheme=_SIGNATURE_SCHEME)
        if any(np.mean(kept[c] == signature) >= threshold for c in lsh.query(minhash)):
            rejected.add(row_id)
        else:
            lsh.insert(row_id, minhash)
            kept[row_id] = signature
    return rejected
