"""Generate README.md from nbs/index.ipynb without quarto (which `nbdev_readme` needs).

    python tools/readme.py           # write README.md
    python tools/readme.py --check   # exit 1 if README.md is out of date
"""
import sys, copy
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file. -->\n\n"

def render() -> str:
    nb = nbformat.read(ROOT/"nbs"/"index.ipynb", as_version=4)
    nb = copy.deepcopy(nb)
    cells = []
    for c in nb.cells:
        lines = c.source.splitlines()
        directives = [l for l in lines if l.startswith("#|")]
        if c.cell_type == "code" and any(d.split()[1:2] in (["hide"], ["export"], ["exporti"]) for d in directives): continue
        if c.cell_type == "code": c.source = "\n".join(l for l in lines if not l.startswith("#|")).strip("\n")
        cells.append(c)
    nb.cells = cells
    body, _ = MarkdownExporter().from_notebook_node(nb)
    body = body.replace("](nbs/", "](nbs/")  # links are already relative to the repo root
    return HEADER + body.strip() + "\n"

if __name__ == "__main__":
    text, out = render(), ROOT/"README.md"
    if "--check" in sys.argv:
        if not out.exists() or out.read_text() != text:
            sys.exit("README.md is out of date with nbs/index.ipynb: run `python tools/readme.py` and commit it.")
        print("README.md agrees with nbs/index.ipynb")
    else:
        out.write_text(text); print(f"wrote {out}")
