"""What a lock may make planc do on this machine. Checked before `planc run` (and `simulate`) act on it.

plan_hash is a checksum, not a signature: anyone can edit a lock and recompute it, so a lock
changed in a pull request must not become a way to set arbitrary variables in the runner's
process, read or write arbitrary paths, or run code. The lock model (plan.py) already limits the
fields that become flags (dtype, attn_implementation, SDPA backends, experts implementation) to
the values planc's rules produce. Here:

- env: only the variables planc's rules set, with values of the form the rules produce
  (`rules.allowed_env`, which also names the one the runner sets itself);
- model.path, model.config, host.disk: relative paths that resolve (symlinks followed) inside the
  lock's tree (the git work tree that holds the lock, else the lock's folder), the Hugging Face
  cache, or a folder listed in PLANC_TRUSTED_DIRS (os.pathsep-separated): the runner's own
  environment, not the lock, says what else it trusts; model.revision may not climb out of the
  Hugging Face cache (no `..` component);
- mixers.requires: only the kernel packages a rule names (the runner imports them to check the
  kernel path);
- model.trust_remote_code: true only with the runner's consent on the command line
  (`planc run --trust-remote-code`): planc hashes config.json and the weights, not the .py files
  a checkpoint ships, so a flag in the lock cannot be that consent.

Every problem is named at once, as one LockError (exit 2): the lock asks for what planc does not write.
"""

from __future__ import annotations

import os
from pathlib import Path

from planc.errors import LockError
from planc.plan import Plan
from planc.rules import allowed_env, allowed_requirements, allowed_requires

TRUSTED_DIRS_VARIABLE = "PLANC_TRUSTED_DIRS"


def lock_tree(lock_dir: Path) -> Path:
    """The tree a lock's paths may point into: the git work tree holding it, else its own folder."""
    folder = lock_dir.resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists():
            return candidate
    return folder


def trusted_roots(lock_dir: Path) -> list[Path]:
    """The lock's tree, the Hugging Face cache and the folders in PLANC_TRUSTED_DIRS, resolved."""
    from huggingface_hub import constants

    roots = [lock_tree(lock_dir), Path(constants.HF_HUB_CACHE)]
    roots += [Path(entry) for entry in os.environ.get(TRUSTED_DIRS_VARIABLE, "").split(os.pathsep) if entry]
    return [root.resolve() for root in roots]


def path_problems(plan: Plan, lock_dir: Path) -> list[str]:
    """Each lock path that is absolute or resolves outside every trusted root."""
    problems = []
    revision = plan.model.revision
    if revision and (revision.startswith("/") or ".." in revision.split("/") or "\0" in revision):
        # A revision names a folder (or a ref file) inside the HF cache: it must not climb out of it.
        problems.append(f"model.revision {revision[:60]!r} is not a branch, tag or commit")
    fields = {"model.path": plan.model.path, "model.config": plan.model.config, "host.disk": plan.host.disk}
    fields = {name: value for name, value in fields.items() if value}
    if not fields:
        return problems
    roots = trusted_roots(lock_dir)
    for name, value in fields.items():
        if "\0" in value or Path(value).is_absolute() or Path(value).drive:
            problems.append(f"{name} {value!r} is not a relative path (planc writes paths relative to the lock)")
            continue
        target = (lock_dir / value).resolve()
        if not any(target == root or root in target.parents for root in roots):
            problems.append(
                f"{name} {value!r} resolves to {target}, outside the lock's tree ({roots[0]}), the Hugging Face "
                f"cache and {TRUSTED_DIRS_VARIABLE}; add its folder to {TRUSTED_DIRS_VARIABLE} if you trust it"
            )
    return problems


def env_problems(plan: Plan) -> list[str]:
    """Each env variable of the lock that no rule sets, or set to a value no rule produces."""
    allowed = allowed_env()
    problems = []
    for name, value in plan.env.items():
        pattern = allowed.get(name)
        if pattern is None:
            problems.append(f"env {name[:60]!r} is not a variable planc sets (it sets {', '.join(allowed)})")
        elif not pattern.fullmatch(value):
            problems.append(f"env {name}={value[:60]!r} is not a value planc's rules produce")
    return problems


def requires_problems(plan: Plan) -> list[str]:
    """Packages the lock's mixers section would have the runner import, and requirements its
    quantization section would have it check, that no rule names."""
    problems = []
    if plan.mixers is not None:
        allowed = allowed_requires()
        problems += [
            f"mixers.requires names {module[:60]!r} ({distribution[:60]}), which no rule requires"
            for module, distribution in plan.mixers.requires.items()
            if allowed.get(module) != distribution
        ]
    if plan.quantization is not None:
        requirements = allowed_requirements()
        problems += [
            f"quantization.requires_packages names {text[:80]!r}, which no rule requires"
            for text in plan.quantization.requires_packages
            if text not in requirements
        ]
    return problems


def check_lock_trust(plan: Plan, lock_dir: Path, trust_remote_code: bool = False, environment: bool = True) -> None:
    """Raise LockError naming everything the lock asks for beyond what planc would write.

    `environment`: also check env (simulate sets none); `trust_remote_code`: the runner consents.
    """
    problems = path_problems(plan, lock_dir) + requires_problems(plan)
    if environment:
        problems = env_problems(plan) + problems
    if plan.model.trust_remote_code and not trust_remote_code:
        problems.append(
            "model.trust_remote_code is true: code a checkpoint ships runs only with --trust-remote-code on the "
            "command line (the lock cannot consent for this machine)"
        )
    if problems:
        raise LockError("the lock asks for what planc does not do: " + "; ".join(problems))
