"""`python -m autotune`: the autotune commands."""

from autotune.families import FAMILIES

USAGE = """pykernels autotune. Commands:

  python -m autotune.<family> [--model M] [--shape k=v] [--batch-sizes ...] [--dtype ...]
                              [--budget S] [--dry-run] [--cpu]   tune a family: {families}
  python -m autotune.show [name] [--runs]      cache, runs/ and shipped entries with metadata
  python -m autotune.diff A.json B.json         tune stability of two cache/runs files
  python -m autotune.ship FILE                  promote a tuned file into autotune/configs/
  python -m autotune.acceptance --family F --out DIR   the GPU acceptance run

SGLANG_FLASHINFER_AUTOTUNE_CACHE=0 tunes afresh into <cache>/autotune/runs/ (cache untouched).
See docs/autotune.md."""

if __name__ == "__main__":
    print(USAGE.format(families=", ".join(FAMILIES)))
