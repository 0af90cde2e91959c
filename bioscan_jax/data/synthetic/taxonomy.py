"""Names and taxonomy of the synthetic BIOSCAN-5M.

:class:`NameMaker` makes unique Latin-looking names for every rank and BOLD-style codes.
:func:`build_taxonomy` draws the tree under phylum Arthropoda (class → order → family →
subfamily → genus → species) by a nested Chinese-restaurant process, the role of every species
(seen, unseen, held-out, dark; see :class:`RoleCounts`) and the genus its DNA descends from
(paraphyly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bioscan_jax.data.synthetic import images as images_lib

# Species roles.
SEEN, UNSEEN, HELDOUT, DARK = "seen", "unseen", "heldout", "dark"
#: A held-out species with a placeholder name in a genus without seen species (while building).
PLACEHOLDER_HELDOUT = "heldout:placeholder"

PHYLUM = "Arthropoda"

#: Classes and their share of genera (BIOSCAN-5M is mostly Insecta).
CLASS_WEIGHTS: dict[str, float] = {
    "Insecta": 0.84,
    "Arachnida": 0.08,
    "Collembola": 0.03,
    "Malacostraca": 0.015,
    "Diplopoda": 0.012,
    "Chilopoda": 0.008,
    "Branchiopoda": 0.008,
    "Ostracoda": 0.007,
}


# ============================================================================= names

_ONSETS = ("b", "c", "d", "g", "l", "m", "n", "p", "r", "s", "t", "v", "h", "f", "x", "z",
           "ch", "ph", "th", "tr", "pr", "cr", "st", "sc", "gl", "pl", "br", "dr", "")
_SIMPLE_ONSETS = ("b", "c", "d", "g", "l", "m", "n", "p", "r", "t", "v", "ph", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ae", "y", "eu")
_CODAS = ("n", "r", "l", "s")
_GENUS_ENDINGS = ("us", "a", "ia", "ella", "omyia", "ops", "odes", "ina", "ura", "ix", "opsis", "ides", "onia")
_EPITHET_ENDINGS = ("i", "ae", "us", "a", "um", "ensis", "ata", "atus", "icola", "iformis", "oides", "ianus")
_ORDER_ENDINGS_NON_INSECT = ("ida", "ones", "morpha", "poda")
LETTERS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


class NameMaker:
    """Deterministic, unique Latin-looking names for every rank, and BOLD-style codes."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self._used: set[str] = set()

    def _pick(self, options: Sequence[str]) -> str:
        return options[int(self._rng.integers(len(options)))]

    def _root(self) -> str:
        """Two or three syllables, without a final vowel, ready for a suffix."""
        parts, after_coda = [], False
        syllables = int(self._rng.integers(2, 4))
        for i in range(syllables):
            onset = self._pick(_SIMPLE_ONSETS if after_coda else _ONSETS)
            coda = self._pick(_CODAS) if i < syllables - 2 and self._rng.random() < 0.5 else ""
            parts.append(onset + self._pick(_VOWELS) + coda)
            after_coda = bool(coda)
        stem = "".join(parts)
        return stem.rstrip("aeiouy") or stem

    def _unique(self, make) -> str:
        while True:
            name = make()
            if name not in self._used and 4 <= len(name) <= 22:
                self._used.add(name)
                return name

    def order(self, class_name: str) -> str:
        ending = "ptera" if class_name == "Insecta" else self._pick(_ORDER_ENDINGS_NON_INSECT)
        return self._unique(lambda: (self._root() + "o" + ending).capitalize())

    def family(self) -> str:
        return self._unique(lambda: (self._root() + "idae").capitalize())

    def subfamily(self) -> str:
        return self._unique(lambda: (self._root() + "inae").capitalize())

    def genus(self) -> str:
        return self._unique(lambda: (self._root() + self._pick(_GENUS_ENDINGS)).capitalize())

    def species(self, genus: str) -> str:
        """A scientific name, "Genus epithet", unique in the dataset."""
        return self._unique(lambda: f"{genus} {self._root()}{self._pick(_EPITHET_ENDINGS)}")

    def placeholder_species(self, genus: str) -> str:
        """A BOLD-style interim name, "Genus sp. ABC1234"."""
        return f"{genus} sp. {self.code()}"

    def code(self) -> str:
        """An unused code of three letters and four digits, like 'ABC1234'."""

        def make():
            letters = "".join(self._rng.choice(LETTERS, 3))
            return letters + "".join(str(d) for d in self._rng.integers(0, 10, 4))

        return self._unique(make)


# ============================================================================= taxonomy


@dataclasses.dataclass
class Taxonomy:
    """The simulated tree. Integer arrays point each node to its parent one rank up."""

    class_names: list[str]
    order_names: list[str]
    order_class: np.ndarray
    order_plan: list[str]  # body plan of the order's drawings (images.BODY_PLANS)
    family_names: list[str]
    family_order: np.ndarray
    subfamily_names: list[str | None]  # None: the family has no named subfamilies
    subfamily_family: np.ndarray
    genus_names: list[str]
    genus_subfamily: np.ndarray
    species_names: list[str]
    species_genus: np.ndarray
    species_role: np.ndarray  # SEEN / UNSEEN / HELDOUT / DARK
    species_dna_genus: np.ndarray  # genus whose ancestor the species' DNA descends from

    @property
    def num_species(self) -> int:
        return len(self.species_names)

    def species_nodes(self) -> dict[str, np.ndarray]:
        """Node index of every species' ancestor at each rank (and the species itself)."""
        genus = self.species_genus
        subfamily = self.genus_subfamily[genus]
        family = self.subfamily_family[subfamily]
        order = self.family_order[family]
        return {
            "class": self.order_class[order],
            "order": order,
            "family": family,
            "subfamily": subfamily,
            "genus": genus,
            "species": np.arange(self.num_species),
        }

    def species_rank_names(self) -> dict[str, np.ndarray]:
        """Name of every species' ancestor at each rank (None for an absent subfamily)."""
        names = {
            "class": self.class_names,
            "order": self.order_names,
            "family": self.family_names,
            "subfamily": self.subfamily_names,
            "genus": self.genus_names,
            "species": self.species_names,
        }
        return {r: np.array(names[r], dtype=object)[nodes] for r, nodes in self.species_nodes().items()}


@dataclasses.dataclass(frozen=True)
class RoleCounts:
    """How many species of each role, and how many labelled records each role gets in all."""

    seen: int
    unseen: int
    heldout: int
    dark: int
    seen_records: int
    unseen_records: int
    heldout_records: int

    @classmethod
    def for_size(cls, num_records: int) -> RoleCounts:
        """Scales with the dataset: one seen species per 100 records, 28% of records seen,
        6% unseen, 4.5% held out, the rest (about 61%) pretrain."""
        n = num_records
        seen, unseen, heldout = max(6, round(n / 100)), max(3, round(n / 200)), max(2, round(n / 200))
        return cls(
            seen=seen,
            unseen=unseen,
            heldout=heldout,
            dark=max(3, round(n / 50)),
            seen_records=max(round(0.28 * n), 3 * seen),
            unseen_records=max(round(0.06 * n), 3 * unseen),
            heldout_records=max(round(0.045 * n), heldout),
        )


def _genus_contents(roles: RoleCounts, rng: np.random.Generator) -> list[list[str]]:
    """The species roles in each genus.

    Seen genera come first and hold one or more seen species (1.7 on average) and all the
    unseen species, spread evenly; the other genera hold the placeholder held-out species (the unseen genera
    of BIOSCAN-5M). Dark species and scientifically named held-out species go anywhere.
    """
    n_seen_genera = max(2, round(roles.seen / 1.7))
    extra = rng.multinomial(roles.seen - n_seen_genera, np.full(n_seen_genera, 1 / n_seen_genera))
    genera: list[list[str]] = [[SEEN] * (1 + int(k)) for k in extra]
    for i in range(roles.unseen):  # spread over the seen genera, one each before any gets two
        if i % n_seen_genera == 0:
            spread = rng.permutation(n_seen_genera)
        genera[spread[i % n_seen_genera]].append(UNSEEN)
    n_placeholder = max(1, roles.heldout // 2)
    n_other = max(1, round(n_placeholder / 1.5)) + max(1, round(0.3 * roles.dark))
    genera += [[] for _ in range(n_other)]
    for i in range(n_placeholder):
        g = i if i < n_other else int(rng.integers(n_other))
        genera[n_seen_genera + g].append(PLACEHOLDER_HELDOUT)
    for _ in range(roles.heldout - n_placeholder):
        genera[int(rng.integers(len(genera)))].append(HELDOUT)
    for _ in range(roles.dark):
        seen_genus = rng.random() < 0.4
        g = int(rng.integers(n_seen_genera)) if seen_genus else n_seen_genera + int(rng.integers(n_other))
        genera[g].append(DARK)
    for species in genera:
        if not species:
            species.append(DARK)
    return genera


class _RankLevel:
    """Nodes of one rank, each under a parent node, grown by a Chinese-restaurant process:
    a new member joins an existing node with probability ∝ its size, a new one ∝ ``alpha``."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.parent: list[int] = []
        self.size: list[int] = []
        self._children: dict[int, list[int]] = {}

    def place(self, parent: int, rng: np.random.Generator, single: bool = False) -> int:
        """Node for a new member under ``parent``; ``single`` keeps one node per parent."""
        own = self._children.setdefault(parent, [])
        if single:
            k = 0
        else:
            weights = np.array([self.size[i] for i in own] + [self.alpha], dtype=np.float64)
            k = int(rng.choice(len(weights), p=weights / weights.sum()))
        if k == len(own):
            own.append(len(self.parent))
            self.parent.append(parent)
            self.size.append(0)
        node = own[k]
        self.size[node] += 1
        return node


#: Share of families that have named subfamilies.
SUBFAMILY_FRACTION = 0.65


def build_taxonomy(roles: RoleCounts, rng: np.random.Generator) -> Taxonomy:
    """Draws the tree, its names, each species' role and each species' DNA ancestry."""
    contents = _genus_contents(roles, rng)
    n_genera = len(contents)
    class_names = list(CLASS_WEIGHTS)
    class_p = np.array(list(CLASS_WEIGHTS.values()))
    orders, families, subfamilies = _RankLevel(2.5), _RankLevel(2.0), _RankLevel(1.0)
    family_has_subfamilies: list[bool] = []
    genus_subfamily = np.zeros(n_genera, dtype=np.int64)
    for i, g in enumerate(rng.permutation(n_genera)):  # seen and other genera mixed in the tree
        c = 0 if i == 0 else int(rng.choice(len(class_names), p=class_p / class_p.sum()))
        f = families.place(orders.place(c, rng), rng)
        if f == len(family_has_subfamilies):
            family_has_subfamilies.append(bool(rng.random() < SUBFAMILY_FRACTION))
        genus_subfamily[g] = subfamilies.place(f, rng, single=not family_has_subfamilies[f])

    names = NameMaker(rng)
    order_class = np.array(orders.parent)
    order_plan = []
    for c in order_class:
        plans = images_lib.BODY_PLANS_BY_CLASS[class_names[c]]
        order_plan.append(plans[int(rng.integers(len(plans)))])
    subfamily_family = np.array(subfamilies.parent)
    genus_names = [names.genus() for _ in range(n_genera)]
    species_names, species_genus, species_role = [], [], []
    for g, roles_here in enumerate(contents):
        for role in roles_here:
            placeholder = role in (UNSEEN, PLACEHOLDER_HELDOUT)
            make = names.placeholder_species if placeholder else names.species
            species_names.append(make(genus_names[g]))
            species_genus.append(g)
            species_role.append(HELDOUT if role == PLACEHOLDER_HELDOUT else role)
    tax = Taxonomy(
        class_names=class_names,
        order_names=[names.order(class_names[c]) for c in order_class],
        order_class=order_class,
        order_plan=order_plan,
        family_names=[names.family() for _ in families.parent],
        family_order=np.array(families.parent),
        subfamily_names=[names.subfamily() if family_has_subfamilies[f] else None for f in subfamily_family],
        subfamily_family=subfamily_family,
        genus_names=genus_names,
        genus_subfamily=genus_subfamily,
        species_names=species_names,
        species_genus=np.array(species_genus),
        species_role=np.array(species_role),
        species_dna_genus=np.array(species_genus),
    )
    tax.species_dna_genus = _paraphyletic_ancestry(tax, rng)
    return tax


#: Fraction of species (per role) whose DNA descends from another genus of their subfamily.
PARAPHYLY_FRACTION = 0.26


def _paraphyletic_ancestry(tax: Taxonomy, rng: np.random.Generator) -> np.ndarray:
    """The genus each species' DNA descends from.

    Its own genus, except for a fixed fraction of each role, whose DNA descends from a related
    genus (same subfamily, else family, else order): the genus is paraphyletic, or the species
    is misplaced in it. Unseen species are misplaced towards genera with seen species, so that
    DNA reads them as that genus; seen species only in genera that keep another seen species,
    so that every seen genus stays recognisable by DNA.
    """
    dna_genus = tax.species_genus.copy()
    g_sub = tax.genus_subfamily
    g_fam = tax.subfamily_family[g_sub]
    g_ord = tax.family_order[g_fam]
    genus_ids = np.arange(len(g_sub))
    seen_per_genus = np.bincount(tax.species_genus[tax.species_role == SEEN], minlength=len(g_sub))
    for role in (SEEN, UNSEEN, HELDOUT, DARK):
        members = np.flatnonzero(tax.species_role == role)
        targets = seen_per_genus > 0 if role == UNSEEN else np.ones(len(g_sub), dtype=bool)
        if role == SEEN:
            members = members[seen_per_genus[tax.species_genus[members]] > 1]
        n_moved = round(PARAPHYLY_FRACTION * int(np.sum(tax.species_role == role)))
        for s in rng.permutation(members)[:n_moved]:
            g = tax.species_genus[s]
            on_own_lineage = (tax.species_role == SEEN) & (tax.species_genus == g) & (dna_genus == g)
            if role == SEEN and on_own_lineage.sum() <= 1:
                continue  # keep one seen species on the genus' own lineage
            for group in (g_sub, g_fam, g_ord):
                relatives = np.flatnonzero((group == group[g]) & (genus_ids != g) & targets)
                if len(relatives):
                    dna_genus[s] = relatives[int(rng.integers(len(relatives)))]
                    break
    return dna_genus
