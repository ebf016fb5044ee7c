"""The recipe on the models of 2026, end to end on the fixtures of tests/fixtures/hf.

A Qwen2-shaped model (q/k/v biases, tied embeddings, ChatML template, no BOS) and a
LLaMA-3-shaped one (rope_scaling llama3, its header template, <|eot_id|> ending turns):
import -> SFT -> comparisons -> RM -> PPO, with LoRA adapters (on SFT, on the RM where it
is trained here, on PPO's policy) -> export-hf; then, when transformers
is installed (it is not a dependency), transformers loads the export and reproduces our
logits, its tokenizer renders and encodes our prompts as we do, and PEFT loads PPO's
adapters alone on the SFT export and reproduces them too.
"""

import json
import os

import numpy as np
import pytest

from rlhf_jax import tokenizer
from rlhf_jax.models import abstract_params, apply, hf
from rlhf_jax.models.transformer import TransformerConfig
from rlhf_jax.train import checkpoints

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = {
  # family: (LM fixture, RM fixture or None: the RM is trained from the SFT policy)
  "qwen2": ("qwen2", "qwen2_rm", "Qwen2ForCausalLM", "<|im_end|>"),
  "llama3": ("llama3", None, "LlamaForCausalLM", "<|eot_id|>"),
}
LORA = ["--config.lora.rank=4", "--config.lora.alpha=8"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def recipe(request, tmp_path_factory, run_cli):
  """One family's run (every stage from the CLI) and its exports, shared by the tests."""
  family = request.param
  lm, rm, arch, end_of_turn = FAMILIES[family]
  tmp = tmp_path_factory.mktemp(family)
  wd = str(tmp / "run")
  init = [f"--config.init.hf_dir={FIX}/{lm}"] + ([f"--config.init.rm_hf_dir={FIX}/{rm}"] * bool(rm))
  base = ["--config", "configs/default.py:runlocal", "--workdir", wd, *init, *LORA]
  for stage in ("sft", "comparisons", "rm", "ppo"):
    run_cli(stage, *base)
  out = {k: str(tmp / k) for k in ("ppo_hf", "rm_hf", "sft_hf", "ppo_peft")}
  for key, policy in (("ppo_hf", "ppo"), ("rm_hf", "rm"), ("sft_hf", "sft")):
    run_cli("export-hf", "--workdir", wd, "--policy", policy, "--dst", out[key])
  # PPO's adapters alone (PEFT's layout), on its frozen base: the SFT policy
  run_cli("export-hf", "--workdir", wd, "--policy", "ppo", "--dst", out["ppo_peft"], "--lora-only")
  tok = tokenizer.load(os.path.join(wd, "pretrain", "tokenizer.json"))
  ppo = checkpoints.params_info(os.path.join(wd, "ppo"))
  params = checkpoints.load_params(
    os.path.join(wd, "ppo"), abstract_params(ppo["model"], ("lm",)), ppo["model"]
  )
  ids = np.asarray([tok.encode_prompt(MESSAGES)])
  logits = np.asarray(
    apply(TransformerConfig.from_config(ppo["model"]), params, ids, heads=("lm",))[0]["lm"]
  )
  return dict(
    family=family,
    arch=arch,
    end_of_turn=end_of_turn,
    wd=wd,
    tok=tok,
    ppo=ppo,
    ids=ids,
    logits=logits,
    **out,
  )


MESSAGES = [{"role": "user", "content": "What is 7 + 5? Answer with one number."}]


@pytest.mark.slow
def test_recipe_on_a_2026_model(recipe):
  tok, ppo = recipe["tok"], recipe["ppo"]
  assert tok.eos_id == tok.encode(recipe["end_of_turn"])[0]  # replies end where turns end
  assert ppo["model"]["eos_id"] == tok.eos_id and ppo["lora"]["rank"] == 4
  assert np.isfinite(ppo["metrics"]["ppo/score"])
  cfg = hf.read_config(recipe["ppo_hf"])
  assert cfg["architectures"] == [recipe["arch"]] and cfg["eos_token_id"] == tok.eos_id
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    assert os.path.exists(os.path.join(recipe["ppo_hf"], name)), name
  assert hf.read_config(recipe["rm_hf"])["architectures"][0].endswith("ForSequenceClassification")
  with open(os.path.join(recipe["ppo_peft"], "adapter_config.json")) as f:
    assert json.load(f)["r"] == 4
  # our own import of the merged export computes what the run's policy computes
  info = hf.import_checkpoint(recipe["ppo_hf"], os.path.join(recipe["wd"], "reimported"))
  params = checkpoints.load_params(
    os.path.join(recipe["wd"], "reimported"), abstract_params(info["model"], ("lm",)), info["model"]
  )
  again = apply(TransformerConfig.from_config(info["model"]), params, recipe["ids"], heads=("lm",))
  np.testing.assert_allclose(np.asarray(again[0]["lm"]), recipe["logits"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_transformers_reproduces_the_export(recipe):
  torch = pytest.importorskip("torch", reason="transformers' own check needs torch (optional)")
  transformers = pytest.importorskip("transformers", reason="optional: pip install transformers")
  out, ids = recipe["ppo_hf"], recipe["ids"]
  theirs_tok = transformers.AutoTokenizer.from_pretrained(out)
  rendered = theirs_tok.apply_chat_template(
    MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
  )
  assert rendered == ids[0].tolist()
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, recipe["logits"], atol=1e-4, rtol=0)
  with open(os.path.join(out, "generation_config.json")) as f:
    assert recipe["tok"].eos_id in np.atleast_1d(json.load(f)["eos_token_id"])


@pytest.mark.slow
def test_peft_loads_the_adapters_on_the_sft_base(recipe):
  torch = pytest.importorskip("torch", reason="PEFT's own check needs torch (optional)")
  transformers = pytest.importorskip("transformers", reason="optional: pip install transformers")
  peft = pytest.importorskip("peft", reason="optional: pip install peft")
  ids = torch.tensor(recipe["ids"])
  base = transformers.AutoModelForCausalLM.from_pretrained(recipe["sft_hf"]).float().eval()
  with torch.no_grad():  # (before PEFT wraps the base: it adds the adapters in place)
    base_logits = base(ids).logits.numpy()
    theirs = peft.PeftModel.from_pretrained(base, recipe["ppo_peft"]).eval()(ids).logits.numpy()
  np.testing.assert_allclose(theirs, recipe["logits"], atol=1e-4, rtol=0)
  assert np.abs(base_logits - recipe["logits"]).max() > 1e-3  # the adapters matter
