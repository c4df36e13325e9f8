"""copd_runtime: the training runtime (torch). Entry point: `copd` (cli.py).

    maths/     losses, log-probs, diagnostics: small pure tensor functions
    data/      examples, JSONL and builtin domains, media, verifiable rewards
    models/    loading/saving policies; VLM prompt encoding
    rollout    sampling responses, scoring tokens
    builtin/   the tiny models `builtin://` builds locally
    model_uri  where a base model comes from
    checkpoint branch checkpoints
    hub        teacher scoring for OPD (in process or over HTTP)
    recipes/   grpo, opd, diagnose, merge, evaluate, stage (one stage of one branch)
    local/     `copd run`: the local executor of copd_core.cycle, progress, plots
    cli        `copd run | validate | build-base | stage | hub | diagnose | merge`
"""
