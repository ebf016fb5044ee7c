"""LoRA (rlhf_jax/lora.py): the adapted model starts as its base and merges as numpy says,
only adapters train (the base bitwise frozen) in SFT, RM and PPO, PPO holds the base
once as its reference, a step on the (2, 2, 2) mesh equals one device, exports (merged
and PEFT's layout) reproduce the adapted model, the planner counts the saving, the
config is checked and fingerprinted."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_ppo import make_config as ppo_config
from test_ppo import prepare_workdir as prepare_ppo_workdir
from test_rm import _toy_rankings, tok  # noqa: F401  (the toy tokenizer fixture)

from rlhf_jax import config_lib, lora, plan, provenance, rl, sharding
from rlhf_jax.data import ranking
from rlhf_jax.errors import UserInputError
from rlhf_jax.models import TransformerConfig, abstract_params, apply, hf, hf_export, hf_tensors
from rlhf_jax.models import init_params as init_model
from rlhf_jax.stages import common, lm, rm
from rlhf_jax.stages.ppo import driver, iteration, rollout
from rlhf_jax.train import checkpoints, optim, train_state

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48)
ALL = tuple(lora.TARGETS)
FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
RUNLOCAL = "configs/default.py:runlocal"


def _settings(rank=4, alpha=8.0, dropout=0.0, targets=ALL, value=False):
  return lora.Settings(rank, alpha, dropout, targets, value)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _randomise_b(trained, seed=1, std=0.2):
  """`trained` with every B drawn at random (as after training), the rest as it is."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    last = getattr(path[-1], "key", None)
    return jnp.asarray(rng.normal(0, std, x.shape), x.dtype) if last == "b" else x

  return jax.tree_util.tree_map_with_path(fill, trained)


def _tokens(batch=3, length=12, vocab=64, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, (batch, length)), jnp.int32)


# --- the math ---------------------------------------------------------------------------------


def test_adapted_model_starts_as_its_base_and_merges_as_numpy_says():
  params, _ = init_model(CFG, jax.random.PRNGKey(0))
  s = _settings()
  trained = lora.trainable(params, s, jax.random.PRNGKey(1))
  tokens = _tokens()
  base_logits = apply(CFG, params, tokens)[0]["lm"]
  # B = 0: the adapted forward is the base's, exactly (x W + (x A) 0)
  adapted = apply(CFG, lora.attach(params, trained, s), tokens)[0]["lm"]
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base_logits))
  # A: PEFT's kaiming-uniform, bound 1/sqrt(fan_in); B: zeros; shapes in our layouts
  layer = trained[lora.KEY]["layer_1"]
  e, h, hk, d, m, r = 32, 4, 2, 8, 48, 4
  shapes = {"q": ((e, r), (r, h, d)), "k": ((e, r), (r, hk, d)), "v": ((e, r), (r, hk, d))}
  shapes |= {"o": ((h, d, r), (r, e)), "gate": ((e, r), (r, m)), "up": ((e, r), (r, m))}
  shapes |= {"down": ((m, r), (r, e))}
  for t, (module, _, _) in lora.TARGETS.items():
    a, b = np.asarray(layer[module][t]["a"]), np.asarray(layer[module][t]["b"])
    assert (a.shape, b.shape) == shapes[t], t
    fan_in = h * d if t == "o" else (m if t == "down" else e)
    assert 0.5 / np.sqrt(fan_in) < np.abs(a).max() <= 1 / np.sqrt(fan_in), t
    assert not b.any(), t
  # merged: W + (alpha / r) A @ B for every target kind, by hand in numpy
  trained = _randomise_b(trained)
  merged = lora.merge(params, trained, s)
  for i in range(CFG.n_layers):
    for t, (module, _, _) in lora.TARGETS.items():
      w = np.asarray(params[f"layer_{i}"][module][t], np.float64)
      ab = trained[lora.KEY][f"layer_{i}"][module][t]
      a = np.asarray(ab["a"], np.float64).reshape(-1, r)
      b = np.asarray(ab["b"], np.float64).reshape(r, -1)
      want = w + (s.alpha / s.rank) * (a @ b).reshape(w.shape)
      got = np.asarray(merged[f"layer_{i}"][module][t])
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=t)
  for path in (("embed", "embedding"), ("final_norm", "scale"), ("lm_head",)):
    x, y = params, merged
    for k in path:
      x, y = x[k], y[k]
    assert x is y  # untouched entries are the base's own arrays (no copy)
  # the merged model computes the adapted one (no dropout): to f32 rounding
  adapted = apply(CFG, lora.attach(params, trained, s), tokens)[0]["lm"]
  assert np.abs(np.asarray(adapted) - np.asarray(base_logits)).max() > 1e-2  # B moved it
  got = apply(CFG, merged, tokens)[0]["lm"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(adapted), atol=1e-5, rtol=1e-5)


def test_only_the_targets_get_adapters_and_dropout_is_a_training_thing():
  params, _ = init_model(CFG, jax.random.PRNGKey(0))
  s = _settings(targets=("q", "v"), dropout=0.5)
  trained = _randomise_b(lora.trainable(params, s, jax.random.PRNGKey(1)))
  assert {t for layer in trained[lora.KEY].values() for t in layer["attn"]} == {"q", "v"}
  assert all(set(layer) == {"attn"} for layer in trained[lora.KEY].values())
  cfg = TransformerConfig(**{**CFG.__dict__, "lora_dropout": 0.5})
  full, tokens = lora.attach(params, trained, s), _tokens()
  logits = lambda **kw: np.asarray(apply(cfg, full, tokens, **kw)[0]["lm"])
  merged = np.asarray(apply(CFG, lora.merge(params, trained, s), tokens)[0]["lm"])
  # deterministic (evaluation): no dropout, the merged model's outputs
  np.testing.assert_allclose(logits(), merged, atol=1e-5, rtol=1e-5)
  # training: the adapters' input is dropped (other draws, other outputs)
  train = lambda k: logits(deterministic=False, rngs={"dropout": jax.random.PRNGKey(k)})
  a, b = train(0), train(1)
  assert np.abs(a - merged).max() > 1e-3 and np.abs(a - b).max() > 1e-3


# --- SFT: only adapters train ---------------------------------------------------------------


def _lm_batch(rows=8, length=32, vocab=1024, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "tokens": rng.integers(3, vocab, (rows, length)).astype(np.int32),
    "segment_ids": np.ones((rows, length), np.int32),
    "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
    "loss_mask": np.ones((rows, length), np.float32),
  }


def _sft_steps(mesh=(1, 1, 1), steps=4, *overrides):
  """`steps` LoRA SFT steps (lm.train_step, as SFT jits it) on `mesh` on a fixed batch;
  returns (setup, first state's base and params on the host, last state, losses)."""
  axes = [(f"mesh.{a}", str(n)) for a, n in zip(sharding.MESH_AXES, mesh, strict=True)]
  config = config_lib.get(
    RUNLOCAL,
    [
      ("lora.rank", "4"),
      ("lora.dropout", "0.1"),
      ("sft.optim.lr", "1e-2"),
      ("sft.optim.warmup_steps", "0"),
      *axes,
      *overrides,
    ],
  )
  adapters = lora.settings(config, "sft")
  devices = jax.devices()[: int(np.prod(mesh))]
  setup = common.create_state(
    config, config.sft.optim, 10, dropout=0.1, adapters=adapters, devices=devices
  )
  step = common.jit_step(
    lm.train_step,
    setup,
    lm.LM_BATCH_NDIMS,
    model_cfg=setup.model_cfg,
    tx=setup.tx,
    schedule=optim.lr_schedule(config.sft.optim, 10),
  )
  state = setup.state
  start = jax.device_get((state.base, state.params))
  losses = []
  with sharding.use(setup.mesh, setup.rules):
    batch = sharding.put_batch(_lm_batch(), setup.mesh)
    for _ in range(steps):
      state, metrics = step(state, batch)
      losses.append(float(metrics["train/loss"]))
  return setup, start, state, losses


@pytest.fixture(scope="module")
def sft_single_device():
  return _sft_steps()


def test_sft_trains_adapters_only_and_leaves_the_base_bitwise(sft_single_device):
  setup, (base0, trained0), state, losses = sft_single_device
  assert isinstance(state, train_state.AdaptedState)
  assert setup.model_cfg.lora_dropout == 0.1
  assert losses[-1] < losses[0] - 0.05, losses
  for x, y in zip(_leaves(base0), _leaves(state.base), strict=True):
    np.testing.assert_array_equal(x, y)  # frozen, bitwise
  after = _leaves(state.params)
  assert all(not np.array_equal(x, y) for x, y in zip(_leaves(trained0), after, strict=True))
  # what an optimiser sees is the adapters alone: AdamW's moments have their shapes
  shapes = sorted(x.shape for x in after)
  moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert sorted(moments) == sorted(shapes * 2)
  assert set(state.params) == {lora.KEY}
  n_trained, n_base = lora.count(state.params), lora.count(state.base)
  assert n_trained < 0.1 * n_base
  # the export is the merged model: it computes the adapted one
  tokens = jnp.asarray(_lm_batch()["tokens"][:2])
  cfg = common.model_config(config_lib.get(RUNLOCAL))
  merged = common.final_params(state)
  want = apply(cfg, train_state.model_params(state), tokens)[0]["lm"]
  got = apply(cfg, merged, tokens)[0]["lm"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_sft_step_on_the_2_2_2_mesh_equals_one_device(sft_single_device):
  assert jax.device_count() == 8
  _, _, one, losses1 = sft_single_device
  setup, _, eight, losses8 = _sft_steps((2, 2, 2))
  q = eight.params[lora.KEY]["layer_0"]["attn"]["q"]  # A [embed, r], B [r, heads, head_dim]
  assert q["a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert q["b"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
  assert eight.base["layer_0"]["attn"]["q"].sharding.spec[0] == "fsdp"
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for x, y in zip(_leaves(one.params), _leaves(eight.params), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)


# --- the reward model -------------------------------------------------------------------------


def test_reward_model_with_lora_learns_the_toy_preference(tok):  # noqa: F811
  """Adapters and the new scalar head train over a frozen (random) trunk; held-out pairs
  are ranked as the toy labelers do."""
  config = config_lib.get(
    RUNLOCAL,
    [("tokenizer.vocab_size", "300"), ("model.vocab_size", "300"), ("model.n_layers", "1")],
  )
  for key, value in (("lora.rank", "8"), ("rm.optim.lr", "1e-2"), ("rm.optim.warmup_steps", "3")):
    config_lib.apply_override(config, key, value)
  num_steps = 30
  setup = rm.create_state(config, num_steps)
  state = setup.state
  assert set(state.params) == {lora.KEY, "scalar_head"} and "scalar_head" not in state.base
  step = common.jit_step(
    rm.train_step,
    setup,
    rm.BATCH_NDIMS,
    model_cfg=setup.model_cfg,
    tx=setup.tx,
    schedule=optim.lr_schedule(config.rm.optim, num_steps),
  )
  base0 = _leaves(state.base)
  kw = dict(seq_len=48, max_responses=4)
  data = iter(ranking.ranking_batches(_toy_rankings(200, seed=0), tok, batch_size=16, seed=0, **kw))
  put = lambda b: sharding.put_batch({k: b[k] for k in rm.BATCH_NDIMS}, setup.mesh)
  with sharding.use(setup.mesh, setup.rules):
    for _ in range(num_steps):
      state, metrics = step(state, put(next(data)))
    for x, y in zip(base0, _leaves(state.base), strict=True):
      np.testing.assert_array_equal(x, y)
    params = common.final_params(state, common.model_shardings(setup))
    eval_fn = jax.jit(functools.partial(rm.eval_step, model_cfg=common.model_config(config)))
    held_out = _toy_rankings(64, seed=99, k_range=(2, 3))
    batches, _ = ranking.fixed_batches(held_out, tok, batch_size=16, **kw)
    r, rank, _ = rm.score(eval_fn, params, batches, put)
  acc = rm.ranking_metrics(r, rank)["rm/val_accuracy"]
  assert acc > 0.8, acc


# --- PPO: the reference is the policy's base, held once ---------------------------------------


@pytest.fixture(scope="module")
def ppo_workdir(tmp_path_factory, repo_root):
  os.chdir(repo_root)
  d = str(tmp_path_factory.mktemp("ppo_lora") / "run")
  prepare_ppo_workdir(d, ppo_config())
  return d


def _ppo_state(workdir, *overrides):
  config = ppo_config([("lora.rank", "4"), *overrides])
  c = config.ppo
  setup = rollout.make_setup(config, c, devices=jax.devices()[:1])
  models = driver.load_models(config, workdir, setup, c)
  models.pop("rm_info")
  return config, setup, rollout.init_state(setup, c, **models, seed=0)


def test_ppo_holds_one_copy_of_the_base_and_trains_adapters(ppo_workdir):
  config, setup, state = _ppo_state(ppo_workdir, ("lora.value", "True"))
  c = config.ppo
  base = state.ref
  assert setup.adapters.value and set(state.policy) == {lora.KEY}
  assert set(state.value) == {lora.KEY, "scalar_head"}
  # one copy of every base kernel in the whole state: the reference's (the RM's trunk,
  # which the value model's adapters sit on, is the other model with these shapes)
  leaves = jax.tree.leaves(state)
  lm_head = base["lm_head"]
  assert sum(x.shape == lm_head.shape for x in leaves) == 1
  for name in ("q", "o"):
    w = base["layer_0"]["attn"][name]
    assert sum(x.shape == w.shape for x in leaves) == 2  # reference + reward model
  _, _, full = _ppo_state(ppo_workdir, ("lora.rank", "0"))
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  assert nbytes(state) < 0.35 * nbytes(full)  # 2 models vs 8 (4 + 2 x 2 moments)
  # before any update the policy's forward IS the reference's: KL exactly 0
  batch = _ppo_prompts(config, ppo_workdir, c.batch_size)
  with sharding.use(setup.mesh, setup.rules):
    ro = jax.jit(
      functools.partial(rollout.rollout, model_cfg=setup.model_cfg, c=c, adapters=setup.adapters)
    )(state, jnp.asarray(batch["prompt_tokens"]), jax.random.PRNGKey(1))

    def logprobs(params):
      out = rollout.forward(
        setup.model_cfg, params, ro.prompt_tokens, ro.response, ro.mask, ("lm",)
      )
      return rl.token_logprobs(out["lm"], ro.response)

    policy = jax.jit(logprobs)(rollout.policy_params(state, setup.adapters))
    np.testing.assert_array_equal(np.asarray(policy), np.asarray(jax.jit(logprobs)(state.ref)))
    assert np.asarray(ro.mask).sum() > 20
    # iterations: finite metrics, the frozen models bitwise, the adapters moved
    before = {k: _leaves(getattr(state, k)) for k in ("policy", "value", "ref", "reward")}
    step = iteration.jit_train_step(setup, c, config.get("guard"))
    put = lambda: sharding.put_batch(batch, setup.mesh)
    state, first = step(state, put())
    state, metrics = step(state, put())
  first, metrics = jax.device_get(first), jax.device_get(metrics)
  assert abs(first["ppo/kl"]) < 1e-5  # (the sampler's log-probs: to f32 rounding)
  for k, v in metrics.items():
    assert np.isfinite(v), k
  for k in ("ref", "reward"):
    for x, y in zip(before[k], _leaves(getattr(state, k)), strict=True):
      np.testing.assert_array_equal(x, y)
  # every adapter of the policy moved; of the value model (on the synthetic RM, whose MLP
  # output is zero: gate and up learn only once `down`'s adapter has) its head and more
  changed = lambda k: [
    not np.array_equal(x, y) for x, y in zip(before[k], _leaves(getattr(state, k)), strict=True)
  ]
  assert all(changed("policy"))
  assert changed("value")[-2:] == [True, True] and sum(changed("value")) > len(changed("value")) / 2
  # what the run exports: the adapters merged into the reference
  exported = rollout.exported(state, setup.adapters)
  assert set(exported) == set(base)
  tokens = jnp.asarray(batch["prompt_tokens"][:2])
  want = apply(setup.model_cfg, rollout.policy_params(state, setup.adapters), tokens)[0]["lm"]
  got = apply(setup.model_cfg, exported, tokens)[0]["lm"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def _ppo_prompts(config, workdir, batch_size):
  from rlhf_jax.data import pipeline

  tok_ = common.load_tokenizer(config, workdir)
  src = common.world_source(config, workdir, "prompts", "train")
  p = pipeline.prompt_batches(src, tok_, batch_size=batch_size, prompt_len=32, seed=0)
  return {"prompt_tokens": next(iter(p))["prompt_tokens"]}


def test_ppo_lora_needs_the_reference_to_be_the_policys_start(ppo_workdir):
  config = ppo_config([("lora.rank", "4"), ("ppo.ref_dir", "sft2")])
  with pytest.raises(UserInputError, match=r"^config\.ppo\.ref_dir: with LoRA") as e:
    rollout.make_setup(config, config.ppo, devices=jax.devices()[:1])
  assert "\n" not in str(e.value)


# --- exports: merged HF weights, PEFT's layout ---------------------------------------------


def test_exports_merged_and_peft_reproduce_the_adapted_model(tmp_path):
  """A few LoRA steps on a Hugging Face LLaMA (the fixture, imported as the base); the
  stage's export (merged) written by export-hf loads back with the adapted model's logits,
  and the PEFT export's tensors are named and shaped as PEFT's and give the same weights."""
  info = hf.import_checkpoint(os.path.join(FIX, "llama"), str(tmp_path / "base"))
  model = info["model"]
  cfg = TransformerConfig.from_config(model)
  base = checkpoints.load_params(str(tmp_path / "base"), abstract_params(model), model)
  s = _settings(rank=4, alpha=16.0)
  oc = optim.optim_config(lr=1e-2, warmup_steps=0)
  tx = optim.make_optimizer(oc, 10)
  trained = lora.trainable(base, s, jax.random.PRNGKey(3))
  state = train_state.AdaptedState.create(trained, tx, jax.random.PRNGKey(0), base=base, settings=s)
  schedule = optim.lr_schedule(oc, 10)
  step = jax.jit(functools.partial(lm.train_step, model_cfg=cfg, tx=tx, schedule=schedule))
  batch = _lm_batch(rows=4, length=16, vocab=model["vocab_size"])
  for _ in range(3):
    state, _ = step(state, batch)
  tokens = jnp.asarray(batch["tokens"][:2])
  adapted = np.asarray(apply(cfg, train_state.model_params(state), tokens)[0]["lm"])
  # the stage's export, as common.finish + save_adapters write it
  stage = str(tmp_path / "sft")
  config = {"init": {"sft_hf_dir": os.path.join(FIX, "llama")}}
  meta = common.save_adapters(stage, state, config, str(tmp_path), "sft")
  assert meta["lora"]["base_hf"] == os.path.join(FIX, "llama")
  checkpoints.export_params(
    stage, common.final_params(state), model, tokenizer=info["tokenizer"], heads=["lm"], **meta
  )
  hf_export.export_checkpoint(stage, str(tmp_path / "merged"))
  again = hf.import_checkpoint(str(tmp_path / "merged"), str(tmp_path / "again"))
  params = checkpoints.load_params(str(tmp_path / "again"), abstract_params(model), model)
  got = np.asarray(apply(cfg, params, tokens)[0]["lm"])
  np.testing.assert_allclose(got, adapted, atol=1e-5, rtol=1e-5)
  assert again["model"]["d_model"] == model["d_model"]
  # PEFT: adapter_config.json + adapter_model.safetensors
  files = hf_export.export_adapters(stage, str(tmp_path / "peft"))
  assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
  with open(tmp_path / "peft" / "adapter_config.json") as f:
    pc = json.load(f)
  assert pc["peft_type"] == "LORA" and pc["task_type"] == "CAUSAL_LM"
  assert (pc["r"], pc["lora_alpha"], pc["lora_dropout"]) == (4, 16, 0.0)
  assert pc["target_modules"] == [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
  ]
  assert pc["base_model_name_or_path"] == os.path.join(FIX, "llama")
  peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  base_hf = dict(hf_tensors.iter_tensors(os.path.join(FIX, "llama")))
  merged_hf = dict(hf_tensors.iter_tensors(str(tmp_path / "merged")))
  n = 0
  for i in range(model["n_layers"]):
    for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.up_proj"):
      name = f"model.layers.{i}.{module}"
      a = peft[f"base_model.model.{name}.lora_A.weight"]
      b = peft[f"base_model.model.{name}.lora_B.weight"]
      w = base_hf[f"{name}.weight"]  # HF: [out, in]
      assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4), name
      want = w.astype(np.float64) + (16.0 / 4) * (b.astype(np.float64) @ a)
      np.testing.assert_allclose(merged_hf[f"{name}.weight"], want, atol=1e-6, err_msg=name)
      n += 1
  assert len(peft) == 2 * 7 * model["n_layers"] and n == 4 * model["n_layers"]
  # a stage trained fully has no adapters to export
  with pytest.raises(UserInputError, match="trained without LoRA"):
    hf_export.export_adapters(str(tmp_path / "base"), str(tmp_path / "none"))


def test_peft_export_of_a_reward_model_saves_its_head(tmp_path):
  params, _ = init_model(CFG, jax.random.PRNGKey(0), heads=("scalar",))
  s = _settings(targets=("q", "v"))
  trained = _randomise_b(lora.trainable(params, s, jax.random.PRNGKey(1), keep=("scalar_head",)))
  stage = str(tmp_path / "rm")
  meta = common.write_adapters(stage, trained, s, {}, str(tmp_path), "sft")
  model = {k: getattr(CFG, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads")}
  model |= {"n_kv_heads": CFG.n_kv_heads, "mlp_dim": CFG.mlp_dim, "head_dim": 0}
  checkpoints.export_params(stage, lora.merge(params, trained, s), model, heads=["scalar"], **meta)
  hf_export.export_adapters(stage, str(tmp_path / "peft"), base_model="me/base")
  with open(tmp_path / "peft" / "adapter_config.json") as f:
    pc = json.load(f)
  assert pc["task_type"] == "SEQ_CLS" and pc["modules_to_save"] == ["score"]
  assert pc["target_modules"] == ["q_proj", "v_proj"] and pc["base_model_name_or_path"] == "me/base"
  peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  np.testing.assert_array_equal(
    peft["base_model.model.score.weight"], np.asarray(trained["scalar_head"]["kernel"]).T
  )
  assert len(peft) == 1 + 2 * 2 * CFG.n_layers


# --- the planner, the config, fingerprints --------------------------------------------------


def test_plan_counts_the_base_once_and_the_adapters_trained():
  config = config_lib.get(RUNLOCAL, [("lora.rank", "8"), ("mesh.data", "1")])
  _, plans = plan.plan(config, 1)
  _, full = plan.plan(config_lib.get(RUNLOCAL, [("mesh.data", "1")]), 1)
  by, by_full = {p.stage: p for p in plans}, {p.stage: p for p in full}
  params, _ = init_model(common.model_config(config), jax.random.PRNGKey(0))
  n_adapters = lora.count(lora.init(params, lora.settings(config, "sft"), jax.random.PRNGKey(0)))
  # per layer and unit of rank: q, o (64 + 64), k, v (64 + 32), gate, up, down (64 + 128)
  assert n_adapters == 2 * 8 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
  sft, sft_full = by["sft"], by_full["sft"]
  assert sft.params == sft_full.params + n_adapters and sft.trained == n_adapters
  assert sft.grad_bytes == 4 * n_adapters and sft.optimizer_bytes == 2 * 4 * n_adapters
  assert sft.full_total == pytest.approx(sft_full.total) and sft.total < sft.full_total
  assert by["pretrain"].full_total == 0 and by["pretrain"].total == by_full["pretrain"].total
  # PPO: reference (= the policy's base), value, reward + the policy's adapters
  ppo, ppo_full = by["ppo"], by_full["ppo"]
  assert ppo.params == ppo_full.params - by_full["sft"].params + n_adapters
  text = plan.format_plan(config, plan.abstract_mesh(config.mesh, 1), plans)
  assert "LoRA rank 8, alpha 16 (scale 2)" in text and "(MiB per device)" in text
  assert any(line.startswith("ppo_ptx") and "%" in line for line in text.splitlines())


@pytest.mark.parametrize(
  "key,value,expected",
  [
    ("lora.rank", "-1", "config.lora.rank: must be >= 0, got -1"),
    ("lora.alpha", "0", "config.lora.alpha: must be > 0, got 0.0"),
    ("lora.dropout", "1.0", "config.lora.dropout: must be in [0, 1), got 1.0"),
    ("lora.targets", "q,qq", "config.lora.targets: unknown 'qq' (known: q,k,v,o,gate,up,down)"),
    ("lora.targets", " ", "config.lora.targets: empty (known: q,k,v,o,gate,up,down)"),
    ("lora.stages", "sft,pretrain", "config.lora.stages: 'pretrain' trains no LoRA adapters"),
    ("lora.rank", "2.5", "config.lora.rank: expected an int, got '2.5'"),
  ],
)
def test_config_errors_are_one_line_naming_the_key(key, value, expected):
  with pytest.raises(UserInputError) as e:
    config_lib.get(RUNLOCAL, [(key, value)])
  assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_stages_and_fingerprints():
  c0 = config_lib.get(RUNLOCAL)
  assert lora.settings(c0, "sft") is None  # rank 0: off everywhere
  on = config_lib.get(RUNLOCAL, [("lora.rank", "4")])
  assert [
    s for s in ("sft", "rm", "ppo", "ppo_ptx", "pretrain", "dpo") if lora.settings(on, s)
  ] == [
    "sft",
    "rm",
    "ppo",
    "ppo_ptx",
  ]
  ppo_only = config_lib.get(RUNLOCAL, [("lora.rank", "4"), ("lora.stages", "ppo")])
  # off: every fingerprint is what it was before the section existed
  without = c0.copy_and_resolve_references()
  with without.unlocked():
    del without["lora"]
  f0, f_without = provenance.fingerprints(c0), provenance.fingerprints(without)
  assert f0 == f_without
  f_on, f_ppo = provenance.fingerprints(on), provenance.fingerprints(ppo_only)
  for stage in ("data", "pretrain"):
    assert f_on[stage] == f0[stage]
  for stage in ("sft", "comparisons", "rm", "ppo"):
    assert f_on[stage] != f0[stage], stage
  for stage in ("sft", "comparisons", "rm"):  # PPO alone trains adapters: the rest is shared
    assert f_ppo[stage] == f0[stage], stage
  assert f_ppo["ppo"] not in (f0["ppo"], f_on["ppo"]) and f_ppo["ppo_ptx"] == f0["ppo_ptx"]
  # a stage finished without LoRA is not taken for one with it (and back)
  d0, d_on = provenance.dependencies(c0), provenance.dependencies(on)
  assert d0["sft"]["lora.rank"] == 0
  diff = provenance.differences(d0["sft"], d_on["sft"])
  assert "config.lora.rank: 0 there, 4 now" in diff
  assert not provenance.differences(d0["sft"], provenance.dependencies(ppo_only)["sft"])
  assert provenance.dependencies(ppo_only)["ppo"]["lora.stages"] == "ppo"


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.slow  # four stages, each in a fresh process
def test_sft_rm_ppo_with_lora_from_the_command_line(runlocal_pretrained, tmp_path, run_cli):
  import shutil

  import orbax.checkpoint as ocp
  from etils import epath

  workdir = str(tmp_path / "run")
  shutil.copytree(runlocal_pretrained, workdir)
  with_lora = ["--config", RUNLOCAL, "--workdir", workdir, "--config.lora.rank=4"]
  with_lora.append("--config.lora.value=True")
  for stage in ("sft", "comparisons", "rm", "ppo"):
    run_cli(stage, *with_lora)
  for stage, heads in (("sft", []), ("rm", ["scalar_head"]), ("ppo", [])):
    info = checkpoints.params_info(f"{workdir}/{stage}")
    assert info["lora"]["rank"] == 4 and info["lora"]["heads"] == heads, stage
    trained = ocp.StandardCheckpointer().restore(f"{workdir}/{stage}/lora")
    assert set(trained) == {lora.KEY, *heads}, stage
  rows = [r for r in checkpoints_metrics(workdir, "ppo") if "ppo/kl" in r]
  assert rows and all(np.isfinite(r["ppo/score"]) for r in rows)
  # PPO's checkpoint: the policy is its adapters, the base is held once (as `ref`)
  ckpts = f"{workdir}/ppo/checkpoints"
  last = max(int(n) for n in os.listdir(ckpts) if n.isdigit())
  meta = ocp.StandardCheckpointHandler().metadata(epath.Path(f"{ckpts}/{last}/state"))
  saved = checkpoints.layout(meta.tree)
  assert any(k.startswith("policy.lora.") for k in saved)
  assert not any(k.startswith("policy.layer_") or k == "policy.lm_head" for k in saved)
  assert sum(k.endswith("lm_head") for k in saved) == 1  # ref.lm_head
  # exports: merged HF weights (the default) and the adapters in PEFT's layout
  run_cli("export-hf", "--workdir", workdir, "--policy", "ppo", "--dst", str(tmp_path / "hf"))
  assert os.path.exists(tmp_path / "hf" / "model.safetensors")
  out = run_cli(
    "export-hf",
    "--workdir",
    workdir,
    "--policy",
    "ppo",
    "--lora-only",
    "--dst",
    str(tmp_path / "p"),
  ).stdout
  assert "LoRA adapters" in out and os.path.exists(tmp_path / "p" / "adapter_model.safetensors")
  # SFT finished with LoRA is not taken for a run without it
  err = run_cli("sft", "--config", RUNLOCAL, "--workdir", workdir, returncode=2).stderr
  assert "config.lora.rank: 4 there, 0 now" in err and "Traceback" not in err


def checkpoints_metrics(workdir, stage):
  from rlhf_jax.train import metrics_io

  return metrics_io.read_metrics(f"{workdir}/{stage}")
