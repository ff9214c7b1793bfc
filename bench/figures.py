"""What every benchmark figure ends with: a title, a tight layout, the PNG, the figure closed."""
from __future__ import annotations


def save_figure(fig, path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
