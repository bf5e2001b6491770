"""Metrics in the Prometheus text exposition format, version 0.0.4, written by hand.

Histogram counts observations into fixed buckets (memory stays the same however
many it sees). Page builds one scrape: each call adds one sample, or one labelled
histogram, to a family; render() writes every family once, with its `# HELP` and
`# TYPE` lines followed by all of its samples, and ends with a newline.

Nothing here does I/O or keeps global state: the controller builds a fresh Page
for every scrape from its own counters, and httpd serves the text with
CONTENT_TYPE.

The format, as far as this module writes it::

    # HELP <name> <help, with \\ and newline escaped>
    # TYPE <name> gauge|counter|histogram
    <name>{<label>="<value, with \\ " and newline escaped>",...} <value>

Values are integers, Python floats (repr: round-trips, "1e-05"), "NaN", "+Inf"
or "-Inf". A counter's name ends in _total and the family keeps that name (0.0.4
does not strip it, unlike OpenMetrics). A histogram <name> is written as
<name>_bucket{...,le="<bound>"} (cumulative, the last le="+Inf" equal to the
count), <name>_sum and <name>_count.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DEFAULT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1, 2.5, 5, 10)      # latencies, in seconds

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

Labels = Mapping[str, object]


class Histogram:
    """Counts of observations per bucket, with their sum and number.

    `buckets` are the upper bounds, strictly increasing and finite; the +Inf bucket
    is always there (a trailing inf in `buckets` is accepted and dropped). A value
    equal to a bound falls in that bound's bucket, as Prometheus's `le` says.
    """

    def __init__(self, buckets: Iterable[float] = DEFAULT_BUCKETS):
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] == math.inf:
            bounds.pop()
        if not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"histogram buckets must be finite numbers, not {bounds}")
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"histogram buckets must be strictly increasing, not {bounds}")
        self.buckets: tuple[float, ...] = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)       # per bucket, not cumulative; last is +Inf
        self.sum = 0.0
        self.count = 0

    @classmethod
    def from_counts(cls, buckets: Iterable[float], counts: Iterable[int],
                    total: float) -> "Histogram":
        """A histogram counted elsewhere (by a mount agent): `counts` per bucket, not
        cumulative, one more than `buckets` (the last is +Inf); `total` their sum."""
        hist = cls(buckets)
        counts = [int(n) for n in counts]
        if len(counts) != len(hist._counts) or any(n < 0 for n in counts):
            raise ValueError(f"{len(hist._counts)} non-negative counts expected, not {counts}")
        hist._counts = counts
        hist.count = sum(counts)
        hist.sum = float(total)
        return hist

    def observe(self, value: float) -> None:
        """Count one observation. NaN is refused (ValueError): it would make the sum NaN
        for the rest of the process's life."""
        if math.isnan(value):
            raise ValueError("cannot observe NaN")
        self._counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) for every bucket, ending with (inf, count)."""
        out = []
        total = 0
        for bound, n in zip(self.buckets + (math.inf,), self._counts):
            total += n
            out.append((bound, total))
        return out


def format_value(value: float) -> str:
    """A sample value (or le bound) as Prometheus parses it."""
    if isinstance(value, int):                       # bool too: 1 or 0
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def check_metric_name(name: str) -> None:
    if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")


def check_label_name(name: str) -> None:
    if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
        raise ValueError(f"invalid label name {name!r}")
    if name.startswith("__"):
        raise ValueError(f"label names starting with __ are reserved: {name!r}")


def _number(value: object, what: str) -> float:
    if not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    return value


def _label_pairs(labels: Labels) -> list[str]:
    """['name="value"', ...] in the caller's order; the names are checked."""
    pairs = []
    for name, value in labels.items():
        check_label_name(name)
        pairs.append(f'{name}="{escape_label_value(str(value))}"')
    return pairs


@dataclass
class _Family:
    name: str
    kind: str
    help: str
    lines: list[str] = field(default_factory=list)
    series: set[tuple] = field(default_factory=set)


class Page:
    """One scrape's worth of metrics, rendered in the order families were first added.

    Adding a sample to an existing family requires the same type and help; the same
    label set twice in one family, or a name that clashes with a histogram's
    _bucket/_sum/_count, raises ValueError.
    """

    def __init__(self):
        self._families: dict[str, _Family] = {}
        self._owners: dict[str, str] = {}         # sample name -> family that writes it

    def gauge(self, name: str, help: str, value: float, labels: Labels | None = None) -> None:
        value = _number(value, f"gauge {name}")
        self._add(name, "gauge", help, labels or {}, [(name, "", value)])

    def counter(self, name: str, help: str, value: float,
                labels: Labels | None = None) -> None:
        if not (isinstance(name, str) and name.endswith("_total")):
            raise ValueError(f"a counter's name must end in _total, not {name!r}")
        value = _number(value, f"counter {name}")
        if not value >= 0:                        # NaN too
            raise ValueError(f"counter {name} must be a non-negative number, not {value}")
        self._add(name, "counter", help, labels or {}, [(name, "", value)])

    def histogram(self, name: str, help: str, hist: Histogram,
                  labels: Labels | None = None) -> None:
        labels = labels or {}
        if "le" in labels:
            raise ValueError(f"histogram {name} cannot have a label named le")
        samples = [(name + "_bucket", f'le="{format_value(bound)}"', n)
                   for bound, n in hist.cumulative()]
        samples += [(name + "_sum", "", hist.sum), (name + "_count", "", hist.count)]
        self._add(name, "histogram", help, labels, samples)

    def render(self) -> str:
        out = []
        for f in self._families.values():
            out.append(f"# HELP {f.name} {escape_help(f.help)}")
            out.append(f"# TYPE {f.name} {f.kind}")
            out.extend(f.lines)
        return "".join(line + "\n" for line in out)

    def _add(self, name: str, kind: str, help: str, labels: Labels,
             samples: list[tuple[str, str, float]]) -> None:
        pairs = _label_pairs(labels)              # checked before the family is made
        family = self._family(name, kind, help)
        key = tuple(sorted((k, str(v)) for k, v in labels.items()))
        if key in family.series:
            raise ValueError(f"{name} already has a sample with labels {{{','.join(pairs)}}}")
        family.series.add(key)
        for sample, extra, value in samples:
            inner = ",".join(pairs + [extra] if extra else pairs)
            braces = "{" + inner + "}" if inner else ""
            family.lines.append(f"{sample}{braces} {format_value(value)}")

    def _family(self, name: str, kind: str, help: str) -> _Family:
        check_metric_name(name)
        if not isinstance(help, str):
            raise TypeError(f"the help of {name} must be a string")
        family = self._families.get(name)
        if family is not None:
            if (family.kind, family.help) != (kind, help):
                raise ValueError(f"{name} is already a {family.kind} with help "
                                 f"{family.help!r}; cannot add a {kind} with help {help!r}")
            return family
        names = [name] + ([name + s for s in _HISTOGRAM_SUFFIXES] if kind == "histogram" else [])
        for n in names:
            if n in self._owners:
                raise ValueError(f"{name} would write samples named {n}, "
                                 f"which {self._owners[n]} already writes")
        for n in names:
            self._owners[n] = name
        family = self._families[name] = _Family(name, kind, help)
        return family
