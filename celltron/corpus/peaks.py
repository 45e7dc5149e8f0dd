"""Chromatin accessibility (ATAC) identity: peaks called per study differ, so each peak is mapped
to a fixed genomic bin (its midpoint's bin, bins of `bin_size` bases from each chromosome's start)
and a corpus's ATAC vocabulary is bins. Two corpora binned with the same size and genome build
share feature names (`chr1:4910000-4915000`).

Peak names are read in the usual spellings (`chr1:100-200`, `chr1_100_200`, `chr1-100-200`),
chromosome names in UCSC style (`1` -> `chr1`, `MT` -> `chrM`). Coordinates only mean something in
one genome build: the build is recorded (from the input or given), and inputs of different builds
are refused, as mixing them would put unrelated loci into one bin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from celltron.errors import InputError

DEFAULT_BIN_SIZE = 5000  # bases: SnapATAC's and ArchR's tile scale, ~5 peaks per bin
# UCSC name -> every spelling accepted (case-insensitive); the UCSC name is what is recorded.
GENOME_BUILDS = {
    "hg19": ("hg19", "grch37", "grch37.p13"),
    "hg38": ("hg38", "grch38", "grch38.p13", "grch38.p14", "grch38-2020-a", "grch38-2024-a"),
    "mm10": ("mm10", "grcm38", "grcm38.p6", "mm10-2020-a"),
    "mm39": ("mm39", "grcm39", "grcm39-2024-a"),
}
_PEAK = re.compile(r"^(?P<chrom>\S+?)[:_\-](?P<start>\d+)[_\-](?P<end>\d+)$")  # shortest chromosome that parses


def genome_build(name: str, where: str = "") -> str:
    """The UCSC name of a genome build given in any accepted spelling."""
    lower = str(name).strip().lower()
    for ucsc, spellings in GENOME_BUILDS.items():
        if lower in spellings:
            return ucsc
    accepted = ", ".join(f"{u} ({', '.join(s[1:3])})" for u, s in GENOME_BUILDS.items())
    raise InputError(f"{where or 'genome build'}: unknown genome build {name!r}; one of {accepted}")


def common_build(builds: dict[str, str | None], given: str | None = None) -> str:
    """The one genome build of several ATAC inputs ({input: build or None when the input does not
    say}) and the `--genome` flag; refused when they disagree or when nobody says."""
    known = {where: genome_build(b, where) for where, b in builds.items() if b}
    if given is not None:
        flag = genome_build(given, "--genome")
        wrong = {w: b for w, b in known.items() if b != flag}
        if wrong:
            listed = ", ".join(f"{w}: {b}" for w, b in wrong.items())
            raise InputError(f"--genome {flag} disagrees with the inputs' own genome build ({listed}); fix the flag or the input")
        return flag
    if not known:
        raise InputError(
            f"{', '.join(builds)}: the ATAC input does not say which genome build its peaks are on; pass --genome (e.g. hg38, mm10)"
        )
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{w}: {b}" for w, b in known.items())
        raise InputError(f"ATAC inputs on different genome builds ({listed}); lift them over to one build first")
    return next(iter(known.values()))


def chromosome(name: str) -> str:
    """UCSC-style chromosome name: a bare number, X, Y or M/MT gains `chr`; MT becomes M."""
    bare = name[3:] if name.lower().startswith("chr") else name
    if bare.upper() in ("M", "MT"):
        return "chrM"
    if bare.isdigit() or bare.upper() in ("X", "Y"):
        return "chr" + bare.upper()
    return name


def parse_peaks(names, where: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chromosome, start, end) per peak name; unreadable names are refused with examples."""
    chroms, starts, ends, bad = [], [], [], []
    for name in map(str, names):
        match = _PEAK.match(name.strip())
        if match is None or int(match["end"]) < int(match["start"]):
            bad.append(name)
            continue
        chroms.append(chromosome(match["chrom"]))
        starts.append(int(match["start"]))
        ends.append(int(match["end"]))
    if bad:
        raise InputError(
            f"{where or 'ATAC peaks'}: {len(bad)} peak names are not genomic intervals, e.g. {', '.join(map(repr, bad[:3]))}; "
            "name peaks chr:start-end (or chr_start_end) with start <= end"
        )
    return np.asarray(chroms, dtype=object), np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def bin_name(chrom: str, index: int, bin_size: int) -> str:
    return f"{chrom}:{index * bin_size}-{(index + 1) * bin_size}"


@dataclass(frozen=True)
class PeakBins:
    """Peaks -> bins: `bins` the bin names in genomic order (chromosome, then position) of the
    bins that hold at least one peak, `peak_bin` each peak's bin (an index into `bins`)."""

    bins: np.ndarray
    peak_bin: np.ndarray
    bin_size: int

    def matrix(self) -> sp.csr_matrix:
        """The (peaks x bins) 0/1 matrix: counts per bin = counts per peak @ this."""
        n = len(self.peak_bin)
        return sp.csr_matrix((np.ones(n, dtype=np.int32), (np.arange(n), self.peak_bin)), shape=(n, len(self.bins)))


def peak_bins(names, bin_size: int = DEFAULT_BIN_SIZE, where: str = "") -> PeakBins:
    """Each peak's bin: the bin holding its midpoint."""
    if bin_size < 1:
        raise InputError(f"{where or 'ATAC'}: bin size must be a positive number of bases, not {bin_size}")
    chroms, starts, ends = parse_peaks(names, where)
    index = (starts + ends) // 2 // bin_size
    order_key = [(_chromosome_order(c), c, int(i)) for c, i in zip(chroms, index)]
    unique = sorted(set(order_key))
    position = {k: j for j, k in enumerate(unique)}
    peak_bin = np.asarray([position[k] for k in order_key], dtype=np.int64)
    bins = np.asarray([bin_name(c, i, bin_size) for _, c, i in unique], dtype=object)
    return PeakBins(bins, peak_bin, bin_size)


def _chromosome_order(chrom: str) -> tuple[int, int, str]:
    """chr1..chr22 by number, then X, Y, M, then everything else by name."""
    bare = chrom[3:] if chrom.startswith("chr") else chrom
    if bare.isdigit():
        return (0, int(bare), "")
    special = {"X": 1, "Y": 2, "M": 3}
    return (1, special[bare], "") if bare in special else (2, 0, chrom)


def bin_counts(counts: sp.csr_matrix, bins: PeakBins) -> sp.csr_matrix:
    """A (cells x peaks) count block summed into (cells x bins), integer counts kept."""
    return sp.csr_matrix(counts @ bins.matrix().astype(counts.dtype))
