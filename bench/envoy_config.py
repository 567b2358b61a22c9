"""The Envoy configs of the bench: which files under deploy/ it runs (CONFIGS, the
one place that names them), the rows it makes of them (PAIRS), and how each file
becomes a bench config (render).

A row runs one file with these edits:

* its ports swapped for free ones and its listener on loopback (the renderer
  `tollway dev` and the tests use), and the HTTP authorizer's port, when its
  ext_authz runs in HTTP service mode (`http_service`), with it;
* the route answers with a `direct_response` (200, "ok"): the upstream costs
  nothing, so what is left is Envoy plus the authorizer;
* a header_mutation filter, first in the chain, copies the `k` query
  parameter into x-api-key (h2load can vary URIs per request but not
  headers; this is how the 10,000-key Zipf mix reaches Envoy). Every row has
  it, so it cancels out of the ratios;
* "ext_authz only" (Pair.authz_only): every other filter of the chain
  (ext_proc, header_to_metadata) and the gRPC access log cut out, comments
  above them included, so the pair shows what Tollway's decision alone costs;
* for the ceiling only, every Tollway filter of the chain (ext_authz, and
  ext_proc when the file runs it) is disabled on that same route.

The edits are textual and each must apply exactly once, so a change to a
deploy file that breaks them fails loudly rather than benchmarking something
else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from tests.harness import REPO_ROOT, render_envoy_config

__all__ = [
    "ACCESS_LOG",
    "CEILING_PAIR",
    "CONFIGS",
    "DEPLOY",
    "EXT_AUTHZ",
    "EXT_PROC",
    "FIXED_RATE",
    "HEADLINE_FLOOR",
    "KEY_QUERY_PARAM",
    "PAIRS",
    "SHIPPED",
    "TOLLWAY_FILTERS",
    "Config",
    "Pair",
    "Planned",
    "Shape",
    "cut_for_authz_only",
    "http_filters",
    "load_configs",
    "plan",
    "render",
    "shape",
    "tollway_filters",
]

DEPLOY: Final = REPO_ROOT / "deploy"

# -- every Envoy config file the bench runs: the one place that names them ---------
#
# Role -> file under deploy/. What a file runs (gRPC Check or HTTP ext_authz;
# ext_proc, the access log or no settlement) is read from the file itself, so
# moving a file is one line here. "shipped" is the deploy config as shipped,
# whatever it runs at run time.
SHIPPED: Final = "shipped"
FIXED_RATE: Final = 1_000.0  # req/s offered through Envoy for issue #13's "p99 added"
CONFIGS: Final[Mapping[str, str]] = {
    SHIPPED: "envoy.yaml",
    "grpc": "envoy-grpc.yaml",  # gRPC Check + ext_proc
    "http": "envoy.yaml",  # HTTP ext_authz (+ access-log settlement: the shipped file)
    "accesslog": "envoy-accesslog.yaml",  # gRPC Check + access-log settlement
}


@dataclass(frozen=True, slots=True)
class Pair:
    """Two Envoy rows: one config behind the no-op authorizer (the floor) and
    behind the sidecar, each answering as the config needs."""

    name: str  # the rows are envoy-noop-<name> and envoy-sidecar-<name>
    config: str  # a role in CONFIGS
    authz_only: bool = False  # every filter but ext_authz cut out, and the access log
    shares: bool = True  # latency at shares of the floor's peak (run.SHARES)
    rates: tuple[float, ...] = ()  # latency at these offered req/s too


# The Envoy rows, in the order they run. Two pairs that come out the same (say,
# a shipped file that is also one of the variants) run once, under the first one's name.
PAIRS: Final = (
    Pair("grpc", "grpc"),  # settlement by ext_proc: every filter of the gRPC file
    Pair("grpc-authz", "grpc", authz_only=True),  # gRPC Check alone: the headline's floor
    Pair("http-authz", "http", authz_only=True),  # HTTP ext_authz alone
    Pair("accesslog", "accesslog", shares=False),  # settlement by the access log
    Pair(SHIPPED, SHIPPED, shares=False, rates=(FIXED_RATE,)),  # the p99 added at 1,000 req/s
)
CEILING_PAIR: Final = "grpc"  # the ceiling is this file with its filters off, at its loads
HEADLINE_FLOOR: Final = "grpc-authz"  # issue #13: the shipped config ≥ 1.5x its no-op row

# -- reading a config ----------------------------------------------------------------

KEY_QUERY_PARAM: Final = "k"
EXT_AUTHZ: Final = "envoy.filters.http.ext_authz"
EXT_PROC: Final = "envoy.filters.http.ext_proc"
ROUTER: Final = "envoy.filters.http.router"
ACCESS_LOG: Final = "envoy.access_loggers.http_grpc"
# The filters that call the tollway cluster, and how a route turns each off.
TOLLWAY_FILTERS: Final = {
    EXT_AUTHZ: "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
    EXT_PROC: "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
}
GRPC_PORT: Final = 50051  # the authorizer's gRPC port, as written in deploy/*.yaml
_ROUTE: Final = re.compile(r"^(?P<indent> *)route: \{ cluster: upstream \}\n", re.M)
_FILTERS: Final = re.compile(r"^(?P<indent> *)http_filters:\n(?P<item> *)- ", re.M)
_FILTER_NAME: Final = re.compile(r"^ *- name: (envoy\.filters\.http\.\w+)", re.M)
_HTTP_URI: Final = re.compile(r"^ *uri: http://127\.0\.0\.1:(\d+)\n", re.M)
# The connection manager's access_log list: the comments just above it, the key
# and every line indented deeper.
_ACCESS_LOG_BLOCK: Final = re.compile(
    r"^(?P<indent> *)(?:#.*\n(?P=indent))*access_log:\n(?:(?P=indent) +\S.*\n)*", re.M
)

Transport = Literal["grpc", "http"]
Settlement = Literal["none", "ext_proc", "access_log"]


@dataclass(frozen=True, slots=True)
class Shape:
    """What a config runs."""

    transport: Transport  # how ext_authz asks: gRPC Check or HTTP service mode
    filters: tuple[str, ...]  # its HTTP filters but the router, in order
    settlement: Settlement  # what settles each request after its response

    def describe(self) -> str:
        ask = "gRPC Check" if self.transport == "grpc" else "HTTP ext_authz"
        settles = {"none": "only", "ext_proc": "+ ext_proc", "access_log": "+ access log"}
        return f"{ask} {settles[self.settlement]}"


def _once(pattern: re.Pattern[str], replace: str, text: str, what: str) -> str:
    text, count = pattern.subn(lambda m: replace.format(**m.groupdict()), text)
    if count != 1:
        raise ValueError(f"envoy config: expected one {what}, found {count}")
    return text


def http_filters(template: str) -> list[str]:
    """The HTTP filters a config runs, in order, but the router."""
    return [name for name in _FILTER_NAME.findall(template) if name != ROUTER]


def tollway_filters(template: str) -> list[str]:
    """The filters of a config that call the tollway cluster, in order (ext_authz at least)."""
    found = [name for name in http_filters(template) if name in TOLLWAY_FILTERS]
    if EXT_AUTHZ not in found:
        raise ValueError(f"envoy config: no {EXT_AUTHZ} filter")
    return found


def _filter_item(name: str) -> re.Pattern[str]:
    """One `- name: <name>` item of a filter list: the comment lines just above it,
    its first line and every line indented deeper than its dash."""
    return re.compile(
        rf"^(?P<indent> *)(?:#.*\n(?P=indent))*- name: {re.escape(name)}\n(?:(?P=indent) +\S.*\n)*",
        re.M,
    )


def shape(template: str) -> Shape:
    filters = http_filters(template)
    authz = _filter_item(EXT_AUTHZ).search(template)
    if authz is None:
        raise ValueError(f"envoy config: no {EXT_AUTHZ} filter")
    transport: Transport = "http" if "http_service:" in authz[0] else "grpc"
    logs = ACCESS_LOG in template
    if logs and EXT_PROC in filters:
        raise ValueError("envoy config: both ext_proc and the access log settle; pick one")
    settlement: Settlement = "ext_proc" if EXT_PROC in filters else "none"
    if logs:
        settlement = "access_log"
    return Shape(transport, tuple(filters), settlement)


@dataclass(frozen=True, slots=True)
class Config:
    role: str
    path: Path
    text: str
    shape: Shape

    @property
    def file(self) -> str:
        return f"deploy/{self.path.name}"


def load_configs(deploy: Path = DEPLOY) -> tuple[dict[str, Config], list[str]]:
    """Each role's config, and the files of CONFIGS that are missing (their rows skipped)."""
    configs, missing = {}, []
    for role, name in CONFIGS.items():
        path = deploy / name
        if not path.is_file():
            missing.append(f"deploy/{name}")
            continue
        text = path.read_text()
        configs[role] = Config(role, path, text, shape(text))
    return configs, sorted(set(missing))


def cut_for_authz_only(template: str) -> tuple[str, list[str]]:
    """The config with every filter but ext_authz (and the router) cut out, and its
    gRPC access log; with what was cut."""
    cut = [name for name in http_filters(template) if name != EXT_AUTHZ]
    for name in cut:
        template = _once(_filter_item(name), "", template, f"'- name: {name}' filter")
    if ACCESS_LOG in template:
        template = _once(_ACCESS_LOG_BLOCK, "", template, "'access_log:' list")
        cut.append("access log")
    return template, cut


def _http_port(template: str) -> int | None:
    """The HTTP authorizer's port of a config whose ext_authz runs in HTTP mode."""
    found = _HTTP_URI.findall(template)
    if len(found) > 1:
        raise ValueError("envoy config: expected at most one 'uri: http://127.0.0.1:<port>'")
    return int(found[0]) if found else None


def render(
    template: str,
    *,
    listen: int,
    admin: int,
    grpc: int,
    http: int | None = None,
    authz: bool = True,
    authz_only: bool = False,
) -> str:
    """A deploy config turned into a bench config, asking the authorizer on grpc
    (and http, for HTTP ext_authz); authz False: the ceiling; authz_only: every
    filter but ext_authz cut out."""
    if authz_only:
        template, _ = cut_for_authz_only(template)
    present = tollway_filters(template)
    ports = {"listen": listen, "admin": admin}
    if re.search(rf"port_value: {GRPC_PORT}\b", template):
        ports["sidecar"] = grpc
    text = render_envoy_config(template, **ports)
    old = _http_port(text)
    if old is not None:
        if http is None:
            raise ValueError("envoy config: ext_authz runs over HTTP; give the HTTP port")
        for pattern, new in [
            (rf"^( *)uri: http://127\.0\.0\.1:{old}\n", rf"\1uri: http://127.0.0.1:{http}\n"),
            (rf"port_value: {old}\b", f"port_value: {http}"),
        ]:
            text, count = re.subn(pattern, new, text, flags=re.M)
            if count != 1:
                raise ValueError(f"envoy config: expected one {pattern!r}, found {count}")
    route = '{indent}direct_response: {{ status: 200, body: {{ inline_string: "ok" }} }}\n'
    if not authz:
        route += "{indent}typed_per_filter_config:\n"
        for name in present:
            route += (
                f"{{indent}}  {name}:\n"
                f'{{indent}}    "@type": type.googleapis.com/{TOLLWAY_FILTERS[name]}\n'
                "{indent}    disabled: true\n"
            )
    text = _once(_ROUTE, route, text, "'route: { cluster: upstream }'")
    copy_key = (
        "{indent}http_filters:\n"
        "{item}- name: envoy.filters.http.header_mutation\n"
        "{item}  typed_config:\n"
        '{item}    "@type": type.googleapis.com/'
        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n"
        "{item}    mutations:\n"
        "{item}      request_mutations:\n"
        "{item}        - append:\n"
        "{item}            header: {{ key: x-api-key, value: "
        f'"%QUERY_PARAM({KEY_QUERY_PARAM})%"'
        " }}\n"
        "{item}            append_action: OVERWRITE_IF_EXISTS_OR_ADD\n"
        "{item}- "
    )
    return _once(_FILTERS, copy_key, text, "'http_filters:' list")


@dataclass(frozen=True, slots=True)
class Planned:
    """A pair as it runs: its config, what it runs, and the pairs it stands for."""

    pair: Pair
    config: Config
    shape: Shape  # after the cut, for an ext_authz-only pair
    cut: tuple[str, ...]  # what the ext_authz-only cut took out
    also: tuple[str, ...] = ()  # names of later pairs that came out the same
    shares: bool = True
    rates: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        return self.pair.name

    def is_(self, name: str) -> bool:
        return name == self.name or name in self.also


def plan(configs: Mapping[str, Config], pairs: Sequence[Pair] = PAIRS) -> list[Planned]:
    """The pairs whose config exists, each run once: a pair whose config and cut
    come out as an earlier one's joins it (its name in `also`, its rates added)."""
    planned: list[Planned] = []
    for pair in pairs:
        config = configs.get(pair.config)
        if config is None:
            continue
        text, cut = cut_for_authz_only(config.text) if pair.authz_only else (config.text, [])
        same = [
            i
            for i, p in enumerate(planned)
            if p.pair.authz_only == pair.authz_only and p.config.text == config.text
        ]
        if same:
            first = planned[same[0]]
            planned[same[0]] = Planned(
                first.pair,
                first.config,
                first.shape,
                first.cut,
                (*first.also, pair.name),
                first.shares or pair.shares,
                tuple(dict.fromkeys((*first.rates, *pair.rates))),
            )
            continue
        planned.append(Planned(pair, config, shape(text), tuple(cut), (), pair.shares, pair.rates))
    return planned
