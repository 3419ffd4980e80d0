"""`python -m clip_heads`: the `clip-heads` command."""
from clip_heads.cli import main

main(prog_name="clip-heads")
