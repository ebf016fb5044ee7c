"""Hugging Face LLaMA-family import / export against transformers' own numbers.

The golden fixtures in tests/fixtures/hf were written by transformers (see
make_fixtures.py there): tiny LLaMA and Mistral LMs and a LLaMA reward model with
random weights, and the logits / scores transformers computes from them. No PyTorch is
needed here; `test_transformers_loads_our_export` also runs the round trip through
transformers itself when it is installed (it is not a dependency).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from rlhf_jax import cli, config_lib, provenance, sharding, tokenizer
from rlhf_jax.models import TransformerConfig, abstract_params, apply, hf, hf_export, hf_tensors
from rlhf_jax.train import checkpoints

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
EXPECTED = np.load(os.path.join(FIX, "expected.npz"))
ATOL = 1e-4  # f32, logits of magnitude ~3


def _cfg(model: dict) -> TransformerConfig:
  return TransformerConfig.from_config(model)


def _import(name: str, dst, **kw):
  info = hf.import_checkpoint(os.path.join(FIX, name), str(dst), **kw)
  heads = tuple(info["heads"])
  params = checkpoints.load_params(str(dst), abstract_params(info["model"], heads), info["model"])
  return info, params


def _lm_logits(model: dict, params, tokens) -> np.ndarray:
  return np.asarray(apply(_cfg(model), params, tokens, heads=("lm",))[0]["lm"])


def _rm_scores(model: dict, params, tokens) -> np.ndarray:
  """HF's pooling: the scalar at each row's last non-pad token (rows right-padded with 0)."""
  seg = (tokens != 0).astype(np.int32)
  out = np.asarray(apply(_cfg(model), params, tokens, None, seg, heads=("scalar",))[0]["scalar"])
  return out[np.arange(len(tokens)), seg.sum(1) - 1]


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_imported_lm_logits_equal_transformers(name, tmp_path):
  info, params = _import(name, tmp_path / "x")
  got = _lm_logits(info["model"], params, EXPECTED["tokens"])
  np.testing.assert_allclose(got, EXPECTED[name], atol=ATOL, rtol=0)
  assert np.abs(EXPECTED[name]).max() > 1.0  # not a trivially small comparison


def test_import_reads_config_json(tmp_path):
  m = hf.import_checkpoint(os.path.join(FIX, "llama"), str(tmp_path / "x"))["model"]
  assert (m["d_model"], m["n_layers"], m["n_heads"], m["n_kv_heads"], m["mlp_dim"]) == (
    64,
    2,
    4,
    2,
    128,
  )
  assert m["rope_theta"] == 500000.0 and m["norm_eps"] == 1e-6 and not m["tie_embeddings"]
  m = hf.import_checkpoint(os.path.join(FIX, "mistral"), str(tmp_path / "y"))["model"]
  assert m["head_dim"] == 24 and m["n_kv_heads"] == 1 and m["tie_embeddings"]
  # transformers < 5 writes rope_theta at the top level instead of rope_parameters
  old = {**hf.read_config(os.path.join(FIX, "llama")), "rope_theta": 1234.0}
  del old["rope_parameters"]
  assert hf.model_fields(old)["rope_theta"] == 1234.0


def test_imported_rm_scores_equal_transformers(tmp_path):
  info, params = _import("llama_rm", tmp_path / "x")
  assert info["heads"] == ["scalar"] and info["reward_bias"] == 0.0
  got = _rm_scores(info["model"], params, EXPECTED["rm_tokens"])
  np.testing.assert_allclose(got, EXPECTED["llama_rm"], atol=ATOL, rtol=0)


def test_import_onto_a_mesh_reads_only_local_slices(tmp_path, monkeypatch):
  reads = []
  real = hf_tensors.Checkpoint.read

  def spy(self, name, index):
    out = real(self, name, index)
    reads.append((name, out.size))
    return out

  monkeypatch.setattr(hf_tensors.Checkpoint, "read", spy)
  mesh_cfg = config_lib.load_config_file("configs/default.py").mesh
  with mesh_cfg.unlocked():
    mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 2, 2, 2
  mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules(mesh_cfg)
  model = hf.import_checkpoint(os.path.join(FIX, "llama"), str(tmp_path / "a"))["model"]
  like = abstract_params(model, ("lm",), mesh, rules)
  reads.clear()
  params = hf_tensors.load_params(
    os.path.join(FIX, "llama"), like, heads=("lm",), tie_embeddings=False
  )
  q = params["layer_0"]["attn"]["q"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  # q_proj [64 heads*dims, 64 embed] is split 2 x 2: no read is more than a quarter of it
  q_reads = [n for name, n in reads if name == "model.layers.0.self_attn.q_proj.weight"]
  assert q_reads and max(q_reads) == 64 * 64 // 4
  got = _lm_logits(model, params, EXPECTED["tokens"])  # computed where the params lie
  np.testing.assert_allclose(got, EXPECTED["llama"], atol=ATOL, rtol=0)


def _tensors(directory) -> dict[str, np.ndarray]:
  return dict(hf_tensors.iter_tensors(str(directory)))


@pytest.mark.parametrize("name,dtype", [("llama", "float32"), ("mistral", "bfloat16")])
def test_round_trip_export_is_the_original_checkpoint(name, dtype, tmp_path):
  info, params = _import(name, tmp_path / "ours")
  out = tmp_path / "hf"
  files = hf_export.save(
    str(out),
    params,
    info["model"],
    tokenizer_path=info["tokenizer"],
    dtype=dtype,
    max_shard_bytes=100_000,
  )
  assert hf_tensors.INDEX in files and (out / hf.TOKENIZER).exists()
  original, exported = _tensors(os.path.join(FIX, name)), _tensors(out)
  if name == "mistral":  # tied: HF saved no lm_head, nor do we
    assert "lm_head.weight" not in exported
  assert sorted(exported) == sorted(original)
  for k, v in original.items():
    assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
    np.testing.assert_array_equal(exported[k], v, err_msg=k)  # bitwise
  orig_cfg = hf.read_config(os.path.join(FIX, name))
  assert hf.model_fields(hf.read_config(str(out))) == hf.model_fields(orig_cfg)
  # and through our import once more
  info2, params2 = _import(str(out), tmp_path / "again")
  got = _lm_logits(info2["model"], params2, EXPECTED["tokens"])
  np.testing.assert_allclose(got, EXPECTED[name], atol=ATOL, rtol=0)


def test_rm_export_keeps_the_reward_bias(tmp_path):
  info, params = _import("llama_rm", tmp_path / "ours")
  from rlhf_jax.stages import rm

  params = rm.add_bias(params, 0.25)
  hf_export.save(str(tmp_path / "hf"), params, info["model"], heads=("scalar",))
  cfg = hf.read_config(str(tmp_path / "hf"))
  assert cfg["architectures"] == ["LlamaForSequenceClassification"]
  assert cfg[hf.SCORE_BIAS_KEY] == 0.25 and cfg["pad_token_id"] == 0
  np.testing.assert_array_equal(  # HF's score is the bias-free head
    _tensors(tmp_path / "hf")["score.weight"],
    _tensors(os.path.join(FIX, "llama_rm"))["score.weight"],
  )
  shutil.copy(os.path.join(FIX, "tokenizer.model"), tmp_path / "hf")
  info2, params2 = _import(str(tmp_path / "hf"), tmp_path / "again")
  assert info2["reward_bias"] == 0.25
  got = _rm_scores(info2["model"], params2, EXPECTED["rm_tokens"])
  np.testing.assert_allclose(got, EXPECTED["llama_rm"] + 0.25, atol=ATOL, rtol=0)


def test_transformers_loads_our_export(tmp_path):
  torch = pytest.importorskip("torch", reason="transformers' own check needs torch (optional)")
  transformers = pytest.importorskip("transformers", reason="optional: pip install transformers")
  for name, cls in (
    ("mistral", transformers.AutoModelForCausalLM),
    ("llama_rm", transformers.AutoModelForSequenceClassification),
  ):
    info, params = _import(name, tmp_path / name)
    out = tmp_path / f"{name}_hf"
    heads = tuple(info["heads"])
    # (the fixture's own tokenizer files are transformers 5's; ours load in 4 and 5)
    hf_export.save(
      str(out), params, info["model"], heads=heads, tokenizer_path=f"{FIX}/tokenizer.model"
    )
    model = cls.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
      if name == "llama_rm":
        got = model(torch.tensor(EXPECTED["rm_tokens"])).logits[:, 0].numpy()
      else:
        got = model(torch.tensor(EXPECTED["tokens"])).logits.numpy()
    np.testing.assert_allclose(got, EXPECTED[name], atol=ATOL, rtol=0)
  text = "Hello world 123, naïve 🙂"
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "mistral_hf"))
  ours = tokenizer.load(os.path.join(FIX, "tokenizer.model"))
  assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
  # a tokenizer trained by rlhf_jax (no dummy prefix)
  texts = [f"The cat {i} sat. What is {i} + {3 * i}? The answer is {4 * i}." for i in range(300)]
  own = tokenizer.train(texts, 300)
  own.save(str(tmp_path / "own" / "tokenizer.model"))
  (tmp_path / "own_hf").mkdir()
  hf_export._save_tokenizer(str(tmp_path / "own" / "tokenizer.model"), str(tmp_path / "own_hf"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "own_hf"))
  for text in ("The cat sat", "What is 12 + 36?", " two  spaces", "ünï 🙂"):
    assert theirs.encode(text, add_special_tokens=False) == own.encode(text), text


# --- the tokenizer --------------------------------------------------------------------------

CASES = json.load(open(os.path.join(FIX, "tokenizer_cases.json"), encoding="utf-8"))["cases"]


def test_llama_tokenizer_encodes_as_sentencepiece_and_transformers():
  tok = tokenizer.load(os.path.join(FIX, "tokenizer.model"))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (320, 1, 2)
  differ = []
  for case in CASES:
    text = case["text"]
    ids = tok.encode(text)
    assert ids == case["sentencepiece"], text
    assert tok.decode(ids) == text  # byte fallback: every string round-trips
    if ids != case["transformers"]:
      differ.append(text)
  # transformers' LlamaTokenizer parses "<s>"/"</s>" in text as control tokens (we never
  # do: user text cannot end a turn) and adds no dummy prefix before a leading space
  # (SentencePiece, LLaMA's reference tokenizer, does); everything else is identical.
  assert differ == [t for t in (c["text"] for c in CASES) if t.startswith(" ") or "<s>" in t]
  assert len(differ) < len(CASES) // 3


def test_llama_tokenizer_chat_format_is_the_rendered_text():
  tok = tokenizer.load(os.path.join(FIX, "tokenizer.model"))
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=os.path.join(FIX, "tokenizer.model"))
  dialogue = [
    {"role": "user", "content": "What is 7 + 5?"},
    {"role": "assistant", "content": "The answer is 12."},
    {"role": "user", "content": "And the dog?"},
  ]
  ids = tok.encode_prompt(dialogue)
  text = tokenizer.render(dialogue, add_generation_prompt=True)
  assert [i for i in ids if i != tok.eos_id] == [tok.bos_id, *sp.encode(text)]
  reply = tok.encode_response("The answer is 12.")
  assert reply[-1] == tok.eos_id and tok.decode_response(reply) == "The answer is 12."


# --- configs and stages ---------------------------------------------------------------------


def test_config_init_takes_shape_and_tokenizer_from_the_checkpoint():
  llama = os.path.join(FIX, "llama")
  c = config_lib.get("configs/default.py", [("init.hf_dir", llama)])
  assert (c.model.d_model, c.model.n_kv_heads, c.model.vocab_size) == (64, 2, 320)
  assert c.model.rope_theta == 500000.0 and c.model.size == "imported"
  assert c.tokenizer.path == os.path.join(llama, "tokenizer.model")
  assert c.tokenizer.vocab_size == 320
  c = config_lib.get(
    "configs/default.py",
    [("init.hf_dir", llama), ("init.rm_hf_dir", os.path.join(FIX, "llama_rm"))],
  )
  assert c.model.d_model == 64
  # a sweep never shares stages across different imports
  base = provenance.fingerprints(config_lib.get("configs/default.py", [("init.hf_dir", llama)]))
  assert provenance.fingerprints(c)["pretrain"] == base["pretrain"]  # the RM is not upstream
  assert provenance.fingerprints(c)["rm"] != base["rm"]
  assert (
    base["pretrain"] != provenance.fingerprints(config_lib.get("configs/default.py"))["pretrain"]
  )
  with pytest.raises(config_lib.UserInputError, match=r"config.model.d_model: 128 given"):
    config_lib.get("configs/default.py", [("init.hf_dir", llama), ("model.d_model", "128")])
  with pytest.raises(config_lib.UserInputError, match=r"config.init.rm_hf_dir: .* disagrees"):
    config_lib.get(
      "configs/default.py",
      [("init.hf_dir", llama), ("init.rm_hf_dir", os.path.join(FIX, "mistral"))],
    )


@pytest.mark.slow
def test_sft_and_rm_start_from_imported_checkpoints(tmp_path, run_cli):
  """A real run: SFT from the imported LLaMA, comparisons sampled from it, the imported
  RM evaluated on them; both exported to the HF layout, the SFT policy sampled. (PPO
  from imported SFT and RM: tests/test_multihost.py.)"""
  wd = str(tmp_path / "run")
  init = [f"--config.init.hf_dir={FIX}/llama", f"--config.init.rm_hf_dir={FIX}/llama_rm"]
  for stage in ("sft", "comparisons", "rm"):
    run_cli(stage, "--config", "configs/default.py:runlocal", "--workdir", wd, *init)
  pre = checkpoints.params_info(os.path.join(wd, "pretrain"))
  assert pre["imported_from"] == os.path.abspath(os.path.join(FIX, "llama"))
  sft = checkpoints.params_info(os.path.join(wd, "sft"))
  assert sft["model"]["d_model"] == 64 and sft["metrics"]["sft/val_loss"] > 0
  rm_info = checkpoints.params_info(os.path.join(wd, "rm"))
  assert rm_info["heads"] == ["scalar"]
  assert 0.0 <= rm_info["metrics"]["rm/val_accuracy"] <= 1.0  # evaluated on the comparisons
  for policy, arch in (("sft", "LlamaForCausalLM"), ("rm", "LlamaForSequenceClassification")):
    out = str(tmp_path / f"{policy}_hf")
    run_cli("export-hf", "--workdir", wd, "--policy", policy, "--dst", out)
    assert hf.read_config(out)["architectures"] == [arch]
    assert os.path.exists(os.path.join(out, "tokenizer.model"))
  proc = run_cli(
    "sample",
    "--workdir",
    wd,
    "--policy",
    "sft",
    "--prompt",
    "What is 2 + 2?",
    "--max-new-tokens",
    "4",
  )
  assert proc.stdout.strip()


# --- bad input ------------------------------------------------------------------------------


def _copy(name, tmp_path) -> str:
  d = str(tmp_path / f"{name}_copy")
  shutil.copytree(os.path.join(FIX, name), d)
  return d


def _edit_config(d, **kv):
  cfg = hf.read_config(d)
  cfg.update(kv)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f)


def _rewrite_tensors(d, fn):
  path = os.path.join(d, "model.safetensors")
  tensors = fn(_tensors(d))
  os.remove(path)
  save_file(tensors, path, metadata={"format": "pt"})


def _bad_arch(d):
  _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")


def _bad_rope(d):
  _edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0})


def _bad_shape(d):
  _edit_config(d, intermediate_size=96)


def _missing_tensor(d):
  _rewrite_tensors(d, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up" not in k})


def _wrong_dtype(d):
  _rewrite_tensors(d, lambda t: {**t, "model.norm.weight": t["model.norm.weight"].astype(np.int32)})


def _extra_tensor(d):
  _rewrite_tensors(
    d, lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(96, np.float32)}
  )


def _truncated(d):
  path = os.path.join(d, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _no_weights(d):
  os.remove(os.path.join(d, "model.safetensors"))
  open(os.path.join(d, "pytorch_model.bin"), "wb").close()


def _no_tokenizer(d):
  os.remove(os.path.join(d, "tokenizer.model"))


def _other_tokenizer(d):  # more pieces than the checkpoint's embedding has rows
  texts = [
    " ".join(f"{a}{b}{c}" for a in "abcdefgh" for b in "ijklmnop") + f" {c}" for c in "qrstuvwxyz"
  ]
  tokenizer.train(texts * 20, 400).save(os.path.join(d, "tokenizer.model"))


def _no_config(d):
  os.remove(os.path.join(d, "config.json"))


BAD = {  # what breaks -> what the one-line error must name
  "arch": (_bad_arch, r"architectures \['GPT2LMHeadModel'\]: unsupported"),
  "rope": (_bad_rope, r"rope type 'llama3'"),
  "shape": (_bad_shape, r"tensor model\.layers\.0\.mlp\.gate_proj\.weight: shape \[128, 64\]"),
  "missing": (_missing_tensor, r"tensor model\.layers\.1\.mlp\.up_proj\.weight: missing"),
  "dtype": (_wrong_dtype, r"tensor model\.norm\.weight: dtype I32"),
  "extra": (_extra_tensor, r"tensor model\.layers\.0\.self_attn\.q_proj\.bias: unexpected"),
  "truncated": (_truncated, r"model\.safetensors: (not a safetensors file|.*unreadable)"),
  "no_weights": (_no_weights, r"no model\.safetensors .*PyTorch \.bin"),
  "no_tokenizer": (_no_tokenizer, r"tokenizer\.model: not found"),
  "no_config": (_no_config, r"config\.json: not found"),
  "other_tokenizer": (_other_tokenizer, r"tokenizer\.model: 400 pieces > vocab_size=320"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_one_line_exit_2(case, tmp_path, capsys):
  breaker, pattern = BAD[case]
  src = _copy("mistral", tmp_path)
  breaker(src)
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  assert cli.main(["import-hf", "--src", src, "--dst", str(dst)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert __import__("re").search(pattern, err), err
  assert sorted(os.listdir(dst)) == ["keep.txt"]  # nothing written


def test_export_refuses_to_overwrite(tmp_path, capsys):
  info, params = _import("mistral", tmp_path / "ours")
  dst = tmp_path / "taken"
  dst.mkdir()
  (dst / "x").write_text("mine")
  with pytest.raises(config_lib.UserInputError, match="exists and is not empty"):
    hf_export.save(str(dst), params, info["model"])
  assert (dst / "x").read_text() == "mine"
