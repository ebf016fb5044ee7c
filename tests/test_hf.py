"""Hugging Face LLaMA / Qwen-family import / export against transformers' own numbers.

The golden fixtures in tests/fixtures/hf were written by transformers (see
make_fixtures.py there): tiny LLaMA and Mistral LMs and a LLaMA reward model with
random weights, then Qwen2 (q/k/v biases, tied), Qwen3 (q/k norms, head_dim 32), LLaMA 3
(llama3 RoPE scaling), SmolLM2 (tied LLaMA) LMs and a Qwen2 reward model, and the
logits / scores transformers computes from them. No PyTorch is needed here;
`test_transformers_loads_our_export` also runs the round trip through transformers
itself when it is installed (it is not a dependency).
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
# Qwen2 / Qwen3 / LLaMA 3 / SmolLM2: vocab 512, their inputs `tokens512` / `rm_tokens512`
NEW = ("qwen2", "qwen3", "llama3", "smollm2", "qwen2_rm")


def _cfg(model: dict) -> TransformerConfig:
  return TransformerConfig.from_config(model)


def _tokens(name: str, rm: bool = False) -> np.ndarray:
  """The inputs transformers computed `EXPECTED[name]` on."""
  return EXPECTED[("rm_tokens" if rm else "tokens") + ("512" if name in NEW else "")]


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


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "llama3", "smollm2"])
def test_imported_lm_logits_equal_transformers(name, tmp_path):
  info, params = _import(name, tmp_path / "x")
  got = _lm_logits(info["model"], params, _tokens(name))
  np.testing.assert_allclose(got, EXPECTED[name], atol=ATOL, rtol=0)
  assert np.abs(EXPECTED[name]).max() > 1.0  # not a trivially small comparison


def test_import_reads_qwen_llama3_and_smollm2_configs(tmp_path):
  """What each family turns on in our config (and nothing else)."""
  want = {  # name: (qkv_bias, qk_norm, rope_type, head_dim, tie_embeddings)
    "qwen2": (True, False, "default", 0, True),
    "qwen3": (False, True, "default", 32, False),
    "llama3": (False, False, "llama3", 0, False),
    "smollm2": (False, False, "default", 0, True),
    "qwen2_rm": (True, False, "default", 0, True),
  }
  keys = ("qkv_bias", "qk_norm", "rope_type", "head_dim", "tie_embeddings")
  for name, values in want.items():
    m = hf.model_fields(hf.read_config(os.path.join(FIX, name)))
    assert tuple(m[k] for k in keys) == values, name
    assert m["vocab_size"] == 512 and m["max_len"] == 256, name
  m = hf.model_fields(hf.read_config(os.path.join(FIX, "llama3")))
  assert (m["rope_theta"], m["rope_factor"], m["rope_original_max_len"]) == (500000.0, 8.0, 64)
  assert (m["rope_low_freq_factor"], m["rope_high_freq_factor"]) == (1.0, 4.0)
  # the q/k/v biases and q/k norms are parameters of their own, with logical axes
  info, params = _import("qwen3", tmp_path / "q3")
  assert params["layer_1"]["attn"]["k_norm"]["scale"].shape == (32,)
  info, params = _import("qwen2", tmp_path / "q2")
  assert params["layer_1"]["attn"]["k_bias"].shape == (2, 16) and "lm_head" not in params
  # an export read as another family is a mismatch, not a tree Orbax cannot restore
  llama = {**info["model"], "qkv_bias": False}
  with pytest.raises(config_lib.UserInputError, match=r"qkv_bias=True \(checkpoint\) vs False"):
    checkpoints.load_params(str(tmp_path / "q2"), abstract_params(llama), llama)


def test_llama3_rope_frequencies_are_transformers(tmp_path):
  """Op for op `_compute_llama3_parameters`: the fixture's frequencies lie in all three
  bands (kept, smoothed, scaled), and the scaling is what its logits depend on."""
  from rlhf_jax.models.transformer import rope_frequencies

  cfg = _cfg(hf.model_fields(hf.read_config(os.path.join(FIX, "llama3"))))
  ours = np.asarray(rope_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling))
  theirs = EXPECTED["llama3_inv_freq"]
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
  plain = np.asarray(rope_frequencies(cfg.dim_per_head, cfg.rope_theta))
  ratio = plain / theirs
  assert ratio[0] == 1.0 and 1.0 < ratio[1] < 8.0 and np.allclose(ratio[2:], 8.0)
  info, params = _import("llama3", tmp_path / "x")
  unscaled = {**info["model"], "rope_type": "default"}
  gap = np.abs(_lm_logits(unscaled, params, _tokens("llama3")) - EXPECTED["llama3"]).max()
  assert gap > 0.1  # the test above would notice plain RoPE


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


@pytest.mark.parametrize("name", ["llama_rm", "qwen2_rm"])
def test_imported_rm_scores_equal_transformers(name, tmp_path):
  info, params = _import(name, tmp_path / "x")
  assert info["heads"] == ["scalar"] and info["reward_bias"] == 0.0
  got = _rm_scores(info["model"], params, _tokens(name, rm=True))
  np.testing.assert_allclose(got, EXPECTED[name], atol=ATOL, rtol=0)


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
  # Qwen2's biases split over `tensor` as their kernels' heads; Qwen3's norms replicated
  for name in ("qwen2", "qwen3"):
    model = _import(name, tmp_path / name)[0]["model"]
    like = abstract_params(model, ("lm",), mesh, rules)
    params = hf_tensors.load_params(
      os.path.join(FIX, name), like, heads=("lm",), tie_embeddings=model["tie_embeddings"]
    )
    attn = params["layer_0"]["attn"]
    if name == "qwen2":
      assert attn["k_bias"].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    else:
      assert attn["q_norm"]["scale"].sharding.spec == jax.sharding.PartitionSpec(None)
    got = _lm_logits(model, params, _tokens(name))
    np.testing.assert_allclose(got, EXPECTED[name], atol=ATOL, rtol=0)


def _tensors(directory) -> dict[str, np.ndarray]:
  return dict(hf_tensors.iter_tensors(str(directory)))


@pytest.mark.parametrize(
  "name,dtype",
  [
    ("llama", "float32"),
    ("mistral", "bfloat16"),
    ("qwen2", "bfloat16"),
    ("qwen3", "bfloat16"),
    ("llama3", "bfloat16"),
    ("smollm2", "bfloat16"),
  ],
)
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
  assert hf_tensors.INDEX in files and (out / os.path.basename(info["tokenizer"])).exists()
  original, exported = _tensors(os.path.join(FIX, name)), _tensors(out)
  if name in ("mistral", "qwen2", "smollm2"):  # tied: HF saved no lm_head, nor do we
    assert "lm_head.weight" not in exported
  assert sorted(exported) == sorted(original)
  for k, v in original.items():
    assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
    np.testing.assert_array_equal(exported[k], v, err_msg=k)  # bitwise
  orig_cfg, cfg = hf.read_config(os.path.join(FIX, name)), hf.read_config(str(out))
  assert hf.model_fields(cfg) == hf.model_fields(orig_cfg)
  if name != "mistral":  # (a Mistral exports as the LLaMA it computes)
    assert (cfg["architectures"], cfg["model_type"]) == (
      orig_cfg["architectures"],
      orig_cfg["model_type"],
    )
  # and through our import once more: the same parameters, bitwise
  info2, params2 = _import(str(out), tmp_path / "again")
  assert info2["model"] == info["model"]
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  got = _lm_logits(info2["model"], params2, _tokens(name))
  np.testing.assert_allclose(got, EXPECTED[name], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
  "name,arch",
  [("llama_rm", "LlamaForSequenceClassification"), ("qwen2_rm", "Qwen2ForSequenceClassification")],
)
def test_rm_export_keeps_the_reward_bias(name, arch, tmp_path):
  info, params = _import(name, tmp_path / "ours")
  from rlhf_jax.stages import rm

  params = rm.add_bias(params, 0.25)
  hf_export.save(str(tmp_path / "hf"), params, info["model"], heads=("scalar",))
  cfg = hf.read_config(str(tmp_path / "hf"))
  assert cfg["architectures"] == [arch]
  assert cfg[hf.SCORE_BIAS_KEY] == 0.25 and cfg["pad_token_id"] == 0
  np.testing.assert_array_equal(  # HF's score is the bias-free head
    _tensors(tmp_path / "hf")["score.weight"],
    _tensors(os.path.join(FIX, name))["score.weight"],
  )
  shutil.copy(os.path.join(FIX, "tokenizer.model"), tmp_path / "hf")
  info2, params2 = _import(str(tmp_path / "hf"), tmp_path / "again")
  assert info2["reward_bias"] == 0.25
  got = _rm_scores(info2["model"], params2, _tokens(name, rm=True))
  np.testing.assert_allclose(got, EXPECTED[name] + 0.25, atol=ATOL, rtol=0)


def test_transformers_loads_our_export(tmp_path):
  torch = pytest.importorskip("torch", reason="transformers' own check needs torch (optional)")
  transformers = pytest.importorskip("transformers", reason="optional: pip install transformers")
  lm, rm = transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification
  for name, cls in (
    ("mistral", lm),
    ("llama_rm", rm),
    ("qwen2", lm),
    ("qwen3", lm),
    ("llama3", lm),
    ("smollm2", lm),
    ("qwen2_rm", rm),
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
      if name.endswith("_rm"):
        got = model(torch.tensor(_tokens(name, rm=True))).logits[:, 0].numpy()
      else:
        got = model(torch.tensor(_tokens(name))).logits.numpy()
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


NEW_FIELDS = (
  "qkv_bias",
  "qk_norm",
  "rope_type",
  "rope_factor",
  "rope_low_freq_factor",
  "rope_high_freq_factor",
  "rope_original_max_len",
)


def test_config_init_takes_the_qwen_and_llama3_fields(tmp_path):
  default = config_lib.get("configs/default.py").model
  for k in NEW_FIELDS:  # every config has them, at values that change nothing
    assert default[k] == getattr(TransformerConfig(1, 8, 1, 1, 1, 8), k), k
  c = config_lib.get("configs/default.py", [("init.hf_dir", os.path.join(FIX, "llama3"))])
  assert (c.model.rope_type, c.model.rope_original_max_len, c.model.qk_norm) == (
    "llama3",
    64,
    False,
  )
  assert c.model.eos_id == tokenizer.load(c.tokenizer.path).encode("<|eot_id|>")[0]
  qwen3 = os.path.join(FIX, "qwen3")
  c = config_lib.get("configs/default.py", [("init.hf_dir", qwen3)])
  assert c.model.qk_norm and not c.model.qkv_bias and c.model.head_dim == 32
  assert c.tokenizer.path.endswith("tokenizer.json") and c.tokenizer.vocab_size < 512
  assert c.model.eos_id == tokenizer.load(c.tokenizer.path).encode("<|im_end|>")[0]
  with pytest.raises(config_lib.UserInputError, match=r"config.model.eos_id: 2 given, but"):
    config_lib.get("configs/default.py", [("init.hf_dir", qwen3), ("model.eos_id", "2")])
  with pytest.raises(config_lib.UserInputError, match=r"config.model.qk_norm: False given"):
    config_lib.get("configs/default.py", [("init.hf_dir", qwen3), ("model.qk_norm", "False")])
  with pytest.raises(config_lib.UserInputError, match=r"config.model.rope_type: must be"):
    config_lib.get("configs/default.py", [("model.rope_type", "yarn")])
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    TransformerConfig(1, 8, 1, 1, 1, 8, rope_type="yarn")


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
  _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})


def _bad_llama3(d):  # (a high_freq_factor is needed to place the bands)
  rope = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0}
  _edit_config(d, rope_parameters=rope)


def _old_rope_scaling(d):  # transformers < 5: rope_theta + rope_scaling, "type" for the kind
  _edit_config(d, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0})


def _bad_model_type(d):  # what transformers computes follows model_type
  _edit_config(d, architectures=["Qwen2ForCausalLM"], model_type="gemma3")


def _attention_bias(d):  # LLaMA / Mistral / Qwen3's attention_bias adds an o bias too
  _edit_config(d, attention_bias=True)


def _gelu(d):
  _edit_config(d, hidden_act="gelu")


def _partial_rotary(d):
  _edit_config(d, partial_rotary_factor=0.5)


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
  os.remove(os.path.join(d, "tokenizer.json"))


def _other_tokenizer(d):  # more pieces than the checkpoint's embedding has rows
  texts = [
    " ".join(f"{a}{b}{c}" for a in "abcdefgh" for b in "ijklmnop") + f" {c}" for c in "qrstuvwxyz"
  ]
  tokenizer.train(texts * 20, 400).save(os.path.join(d, "tokenizer.model"))


def _no_config(d):
  os.remove(os.path.join(d, "config.json"))


BAD = {  # what breaks -> what the one-line error must name
  "arch": (_bad_arch, r"architectures \['GPT2LMHeadModel'\]: unsupported"),
  "rope": (_bad_rope, r"rope_parameters\.rope_type: rope type 'yarn' unsupported"),
  "llama3": (_bad_llama3, r"rope_parameters\.high_freq_factor: expected a positive number"),
  "rope_scaling": (_old_rope_scaling, r"rope_scaling\.rope_type: rope type 'linear'"),
  "model_type": (_bad_model_type, r"model_type 'gemma3': unsupported"),
  "attention_bias": (_attention_bias, r"attention_bias=True: unsupported"),
  "hidden_act": (_gelu, r"hidden_act='gelu': unsupported"),
  "partial_rotary": (_partial_rotary, r"partial_rotary_factor=0\.5: unsupported"),
  "shape": (_bad_shape, r"tensor model\.layers\.0\.mlp\.gate_proj\.weight: shape \[128, 64\]"),
  "missing": (_missing_tensor, r"tensor model\.layers\.1\.mlp\.up_proj\.weight: missing"),
  "dtype": (_wrong_dtype, r"tensor model\.norm\.weight: dtype I32"),
  "extra": (_extra_tensor, r"tensor model\.layers\.0\.self_attn\.q_proj\.bias: unexpected"),
  "truncated": (_truncated, r"model\.safetensors: (not a safetensors file|.*unreadable)"),
  "no_weights": (_no_weights, r"no model\.safetensors .*PyTorch \.bin"),
  "no_tokenizer": (_no_tokenizer, r"no tokenizer\.model or tokenizer\.json"),
  "no_config": (_no_config, r"config\.json: not found"),
  "other_tokenizer": (_other_tokenizer, r"tokenizer\.model: 400 ids > vocab_size=320"),
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


def test_sliding_windows_cap_max_len_where_any_layer_slides():
  """Full attention is a sliding window's computation while no sequence outgrows the
  window: Mistral always slides, Qwen only with use_sliding_window (and, in
  transformers 5's layer_types, on a layer marked sliding)."""
  qwen = hf.read_config(os.path.join(FIX, "qwen2"))
  assert qwen["use_sliding_window"] is False and qwen["max_position_embeddings"] == 256
  max_len = lambda **kv: hf.model_fields({**qwen, **kv})["max_len"]
  assert max_len(sliding_window=32) == 256  # not used
  assert max_len(sliding_window=32, use_sliding_window=True) == 256  # layer_types: all full
  slides = ["full_attention", "sliding_attention"]
  assert max_len(sliding_window=32, use_sliding_window=True, layer_types=slides) == 32
  old = {k: v for k, v in qwen.items() if k != "layer_types"}  # transformers < 5
  assert hf.model_fields({**old, "sliding_window": 32, "use_sliding_window": True})["max_len"] == 32
  mistral = hf.read_config(os.path.join(FIX, "mistral"))
  assert hf.model_fields({**mistral, "sliding_window": 100})["max_len"] == 100


def test_export_refuses_what_no_hf_architecture_computes(tmp_path):
  info, params = _import("qwen2", tmp_path / "ours")
  model = {**info["model"], "qk_norm": True}
  with pytest.raises(config_lib.UserInputError, match=r"config\.model\.qk_norm: with qkv_bias"):
    hf_export.save(str(tmp_path / "hf"), params, model)
  assert not os.path.exists(tmp_path / "hf")


def test_export_refuses_to_overwrite(tmp_path, capsys):
  info, params = _import("mistral", tmp_path / "ours")
  dst = tmp_path / "taken"
  dst.mkdir()
  (dst / "x").write_text("mine")
  with pytest.raises(config_lib.UserInputError, match="exists and is not empty"):
    hf_export.save(str(dst), params, info["model"])
  assert (dst / "x").read_text() == "mine"
