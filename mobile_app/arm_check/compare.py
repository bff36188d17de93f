"""Compare greedy.py's x86 tokens with each emulated arm64 CPU's; exit 1 if a strict CPU differs.

    python compare.py WORK "max cortex-a76 cortex-a53" "max cortex-a76"

WORK holds x86.json and arm64-{cpu}.json (greedy.py --margins output). Every prompt must be present
on both sides with the same number of tokens, all equal. Before comparing, the check proves it can
fail: a copy of the x86 reference with one token changed must be reported as differing, or this
exits 1 as well (a comparison that cannot fail would pass anything).
"""

import json
import sys
from pathlib import Path


def differences(ref: dict, got: dict) -> list[str]:
    """One line per prompt whose tokens are not identical (or missing, or of another length)."""
    out = []
    for prompt, expected in ref.items():
        if prompt not in got:
            out.append(f"{prompt!r}: missing from the arm64 output")
            continue
        want, have = expected["tokens"], got[prompt]["tokens"]
        step = next((i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b), None)
        if step is not None:
            out.append(f"{prompt!r}: DIFFER at step {step}: x86 {want[step]} vs arm64 {have[step]}; "
                       f"x86 top1-top2 logit margin there {expected['margins'][step]}")
        elif len(want) != len(have):
            out.append(f"{prompt!r}: {len(have)} tokens on arm64, {len(want)} on x86")
    return out


def main() -> int:
    work, cpus, strict = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
    x86 = json.loads((work / "x86.json").read_text())
    if not x86 or any(len(v["tokens"]) == 0 for v in x86.values()):
        print("x86.json has no tokens: nothing to compare")
        return 1
    # Negative control: the same comparison on a reference with one token changed must fail.
    prompt = next(iter(x86))
    perturbed = {p: {**v, "tokens": list(v["tokens"])} for p, v in x86.items()}
    perturbed[prompt]["tokens"][-1] += 1
    if not differences(x86, perturbed):
        print("negative control failed: a changed token was not reported")
        return 1
    failed = False
    for cpu in cpus:
        arm = json.loads((work / f"arm64-{cpu}.json").read_text())
        diffs = differences(x86, arm)
        if not diffs:
            counts = ", ".join(str(len(v["tokens"])) for v in x86.values())
            print(f"{cpu:11} MATCH: {len(x86)} prompts x ({counts}) tokens identical to x86")
        for line in diffs:
            print(f"{cpu:11} {line}{'' if cpu in strict else '  (not strict: reported only)'}")
        failed |= bool(diffs) and cpu in strict
    print("arm_check: FAIL" if failed else "arm_check: OK (strict: " + " ".join(strict) + ")")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
