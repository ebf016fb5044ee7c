"""Stage 4: PPO (and, with `stages/ppo_ptx.py`, PPO-ptx) against the reward model.

  rlhf-jax ppo     --config configs/ppo.py --workdir DIR
  rlhf-jax ppo_ptx --config configs/ppo_ptx.py --workdir DIR

Starts from the SFT policy (`DIR/sft`) and the reward model (`DIR/rm`). One PPO
iteration is ONE jit-compiled `train_step(state, batch) -> (state, metrics)`
(`iteration.py`):

  1. rollout     sample one response per prompt with the KV-cache sampler (temperature
                 1: the sampler's log-probs are the behaviour policy's, no second
                 forward); reference log-probs, values, and the RM score read at the
                 last response token (prompt + response, as the RM was trained);
  2. rewards     r_t = -beta * KL_t on every response token + the (penalised / scaled /
                 clipped) score on the last one (`rl.shaped_rewards`);
  3. advantages  GAE (gamma, lambda) as a reverse scan, whitened over the batch;
  4. update      `num_epochs` x `num_minibatches` of clipped policy loss (+ entropy bonus,
                 + gamma_ptx x the pretraining LM loss for PPO-ptx) and clipped value
                 loss, as nested `lax.scan`s; then the KL controller updates beta.

The train state holds policy, value, reference and reward parameters as separate
pytrees; only policy and value reach an optimiser (each its own), so the reference and
the reward model are bitwise unchanged. With LoRA (`config.lora`) the policy is adapters
over the reference, its frozen base held once (and with `lora.value` the value model is
adapters and a head over a trunk the state holds already); the export is merged. The
value model starts from the reward model (the paper) or from the SFT trunk with a zero
scalar head (`value_init="sft"`).
Writes `DIR/<stage>/{checkpoints,metrics.jsonl,tb,params,params.json}` (the exported
params: the policy, or its bias-corrected EMA when `optim.ema_decay > 0`, whose gold
score is logged beside the policy's as `gold_score_raw`); resumes exactly (state,
prompt iterator and pretraining iterator are checkpointed together).

  settings.py   the config section, the paper's preset, validation, `HPARAMS`
  rollout.py    `PPOState` (its layout on the mesh, its creation) and the rollout
  iteration.py  the losses and the jitted `train_step`
  driver.py     data, loading SFT and the RM, the gold evaluation, `train_and_evaluate`
  group.py      many runs as one vmapped program (sweeps)
"""
