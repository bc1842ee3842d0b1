"""Write examples/run.toml and the reference table of docs/configuration.md from the typed
config models (raysoup.config), after a key, a default or a method changed:

    .venv/bin/python scripts/config_reference.py

tests/unit/test_run_config.py fails while either file differs from what this writes."""

from pathlib import Path

from raysoup.config import EXAMPLE, example_config, reference_table

BEGIN, END = "<!-- config-reference:begin -->\n", "\n<!-- config-reference:end -->"
DOC = Path(__file__).parents[1] / "docs" / "configuration.md"


def main() -> None:
    EXAMPLE.write_text(example_config())
    head, rest = DOC.read_text().split(BEGIN)
    DOC.write_text(head + BEGIN + reference_table() + END + rest.split(END)[1])
    print(f"wrote {EXAMPLE} and the reference in {DOC}")


if __name__ == "__main__":
    main()
