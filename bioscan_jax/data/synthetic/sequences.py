"""DNA of the synthetic BIOSCAN-5M: COI-like barcodes evolved down the taxonomy.

An ancestral, codon-structured sequence (A+T rich) evolves along the tree under an HKY-like
model (:class:`SequenceEvolver`: transitions favoured, third codon positions fastest, gamma
site rates, per-lineage rate noise). :func:`evolve_species_sequences` gives the aligned
ancestral sequence of every species; BINs, haplotypes and reads are drawn from them in
:mod:`bioscan_jax.data.synthetic.specimens`.
"""

from __future__ import annotations

import numpy as np

from bioscan_jax.data.synthetic.taxonomy import Taxonomy

#: Alignment length; the standard 658-nt COI-5P window starts at BARCODE_START.
ALIGNED_LENGTH = 720
BARCODE_START = 39
BARCODE_LENGTH = 658
MIN_BARCODE_LENGTH, MAX_BARCODE_LENGTH = 500, 700
#: Stationary base frequencies (A, C, G, T) per codon position: COI is A+T rich, most at 3rd.
BASE_FREQS = np.array(
    [
        [0.28, 0.17, 0.27, 0.28],
        [0.17, 0.24, 0.16, 0.43],
        [0.44, 0.08, 0.05, 0.43],
    ]
)
#: Relative substitution rate per codon position (mean 1), and gamma shape across sites.
CODON_RATES = np.array([0.45, 0.12, 2.43])
GAMMA_SHAPE = 0.5
#: Transition / transversion rate ratio.
KAPPA = 4.0
#: Expected substitutions per site on the branch above a node of each rank.
BRANCH_LENGTHS: dict[str, float] = {
    "class": 0.3,
    "order": 0.25,
    "family": 0.12,
    "subfamily": 0.06,
    "genus": 0.07,
    "species": 0.03,
    "bin": 0.008,
    "haplotype": 0.0025,
}
#: Log-normal sd of per-branch rate noise (lineages evolve at different speeds).
LINEAGE_RATE_SD = 0.35
_NUCLEOTIDES = np.frombuffer(b"ACGT", dtype=np.uint8)
_TRANSITION = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)  # A<->G, C<->T


def _hky_jumps() -> tuple[np.ndarray, np.ndarray]:
    """HKY jump chain per codon position: (3, 4, 4) cumulative P(new | old) and (3, 4) exit rates.

    Rates Q_ij ∝ π_j · (κ if i→j is a transition else 1); exit rates are scaled so that one
    unit of branch length is one expected substitution per site at stationarity.
    """
    q = BASE_FREQS[:, None, :] * np.where(_TRANSITION, KAPPA, 1.0)[None] * (1.0 - np.eye(4))[None]
    exit_rates = q.sum(axis=-1)
    exit_rates /= (BASE_FREQS * exit_rates).sum(axis=-1, keepdims=True)
    return np.cumsum(q / q.sum(axis=-1, keepdims=True), axis=-1), exit_rates


class SequenceEvolver:
    """Evolves aligned uint8 sequences (0..3 = ACGT) along branches.

    On a branch, a site is hit with probability 1 - exp(-length × site rate × exit rate of its
    base) and then jumps to a new base by the HKY jump chain. With exit rates q_i = Σ_j π_j κ_ij
    this approximates the HKY process (one substitution per site per branch at most), whose
    stationary frequencies are :data:`BASE_FREQS`.
    """

    _BLOCK = 4096

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        positions = np.arange(ALIGNED_LENGTH) % 3
        gamma = rng.gamma(GAMMA_SHAPE, 1.0 / GAMMA_SHAPE, ALIGNED_LENGTH)
        rates = CODON_RATES[positions] * gamma
        self.site_rates = rates / rates.mean()
        self.positions = positions
        self._cdf, self._exit = _hky_jumps()

    def root(self) -> np.ndarray:
        """An ancestral sequence drawn from the per-position base frequencies."""
        u = self._rng.random(ALIGNED_LENGTH)
        cdf = np.cumsum(BASE_FREQS, axis=1)[self.positions]
        return (u[:, None] > cdf).sum(axis=1).clip(0, 3).astype(np.uint8)

    def evolve(self, parents: np.ndarray, branch_length: float, noise: bool = True) -> np.ndarray:
        """Children of ``parents`` (m, L) after a branch of the given expected length.

        ``noise`` multiplies each branch by a log-normal rate (mean 1, sd LINEAGE_RATE_SD).
        """
        m = parents.shape[0]
        lengths = np.full(m, branch_length)
        if noise:
            lengths = lengths * self._rng.lognormal(-0.5 * LINEAGE_RATE_SD**2, LINEAGE_RATE_SD, m)
        children = parents.copy()
        for start in range(0, m, self._BLOCK):  # blocks bound the memory of the (m, L) draws
            block = slice(start, start + self._BLOCK)
            old = parents[block]
            rates = lengths[block, None] * self.site_rates[None, :] * self._exit[self.positions[None, :], old]
            rows, cols = np.nonzero(self._rng.random(old.shape) < -np.expm1(-rates))
            cdf = self._cdf[self.positions[cols], old[rows, cols]]
            new = (self._rng.random(len(rows))[:, None] > cdf).sum(axis=1).clip(0, 3)
            children[rows + start, cols] = new
        return children


def to_text(codes: np.ndarray) -> str:
    """ACGT string of a uint8 code sequence."""
    return _NUCLEOTIDES[codes].tobytes().decode("ascii")


def evolve_species_sequences(tax: Taxonomy, rng: np.random.Generator) -> tuple[np.ndarray, SequenceEvolver]:
    """Aligned ancestral sequence of every species, evolved down the tree (paraphyly included)."""
    evo = SequenceEvolver(rng)
    root = evo.root()[None]
    classes = evo.evolve(np.repeat(root, len(tax.class_names), axis=0), BRANCH_LENGTHS["class"])
    orders = evo.evolve(classes[tax.order_class], BRANCH_LENGTHS["order"])
    families = evo.evolve(orders[tax.family_order], BRANCH_LENGTHS["family"])
    subfamilies = evo.evolve(families[tax.subfamily_family], BRANCH_LENGTHS["subfamily"])
    genera = evo.evolve(subfamilies[tax.genus_subfamily], BRANCH_LENGTHS["genus"])
    species = evo.evolve(genera[tax.species_dna_genus], BRANCH_LENGTHS["species"])
    return species, evo
