"""``python -m data_converters.annotate [run] ...`` annotates; ``python -m data_converters.annotate review ...`` reviews."""

import sys

from gpt4roi_sft.errors import run_cli


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "review":
        from data_converters.annotate.review import main as review_main

        return review_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    from data_converters.annotate.run import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
