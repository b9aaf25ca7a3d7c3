"""A fixed, seeded traffic mix against the gateway, with canaries in every request and what it expects.

The plan is made up front from a seed (:func:`make_plan`): the same request count, kinds, visitors and canaries
every run. :func:`run_traffic` sends it with bounded concurrency over keep-alive connections and stops starting
new requests at a hard deadline, whatever is left.

Mix: page views (GET ``/p/<id>/...`` HTML), long pages (2,000+ character URL, 600-character title), account pages
(a title holding an e-mail address), assets (CSS/JS/PNG), bots (crawler user agents on pages), beacons
(``POST /api/event`` custom events as the Plausible tracker sends them), 404s, redirects, HEAD requests and
prefetches. Visitors have granted, refused or no consent (real signed cookies from ``POST /_privacy/consent``),
some send ``Sec-GPC: 1``.

Canaries in every request: ``X-Forwarded-For`` with a full client address (the gateway trusts 127.0.0.1, so it is
believed and must be truncated), sometimes behind a spoofed address and with ``X-Real-IP``/``Forwarded`` copies;
``email=`` and ``token=`` query parameters; a ``Referer`` holding a token and an e-mail; a ``sessionid`` cookie; an
``Authorization: Bearer`` header; beacon props with an e-mail. None of it may reach a collector.

Expectations are decided from the answer each request got: a page view counts when it was a non-bot,
non-prefetch ``GET`` answered ``200 text/html``; a beacon counts when answered ``202`` without
``x-plausible-dropped``. Each counted event is expected at every destination as MUST / MAY / MUST_NOT
(:func:`expectation`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import random
import time
import uuid
from collections.abc import Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Final, Literal

import httpx

from tests.load.checker import Expect, RequestResult
from tests.load.collectors import TITLE_CANARY

__all__ = [
    "BOT_USER_AGENTS",
    "BROWSER_USER_AGENTS",
    "Canaries",
    "Destination",
    "Planned",
    "Progress",
    "TrafficRun",
    "Visitor",
    "expectation",
    "make_canaries",
    "make_plan",
    "run_traffic",
]

ConsentState = Literal["granted", "refused", "none"]

EMAIL_CANARY: Final = "load-canary@example.org"
# Full client addresses. Documentation ranges plus two realistic-looking ones; no last octet is a prefix of
# another canary's, so a substring hit is always a real leak.
IPV4_CANARIES: Final = (
    "198.51.100.77",
    "203.0.113.199",
    "192.0.2.123",
    "198.51.100.231",
    "203.0.113.45",
    "81.2.69.160",
)
IPV6_CANARIES: Final = ("2001:db8:85a3:8d3:1319:8a2e:370:7348", "2a02:c7f:48a3:7e00:9d1c:33ef:51a2:6b7f")
# Spoofed addresses a client puts in front of its own; the gateway must ignore them, and never pass them on.
SPOOFED_IPS: Final = ("192.0.2.222", "100.64.12.34")

BROWSER_USER_AGENTS: Final = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 "
    "Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 "
    "Safari/605.1.15",
)
BOT_USER_AGENTS: Final = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "python-requests/2.32.3",
    "curl/8.8.0",
)
LANGUAGES: Final = ("en-US,en;q=0.9", "de-DE,de;q=0.8,en;q=0.5", "fr-FR,fr;q=0.9", "ja,en-US;q=0.7")

# kind -> weight in the mix
MIX: Final = {
    "page": 44,
    "long": 4,
    "account": 4,
    "asset": 12,
    "bot": 10,
    "beacon": 13,
    "missing": 4,
    "redirect": 3,
    "head": 3,
    "prefetch": 3,
}
PAGE_KINDS: Final = frozenset({"page", "long", "account"})
CUSTOM_EVENTS: Final = ("signup", "download")
ALLOWED_PROPS: Final = ("plan", "source")


@dataclasses.dataclass(frozen=True, slots=True)
class Destination:
    """What the traffic needs to know about one configured destination to predict its events."""

    name: str
    requires: frozenset[str]
    # Identifies browsers by the first-party id cookie (GA4 with client_id = "cookie"): an event from a request
    # without that cookie (a beacon before the visitor's first page view) may be dropped by policy.
    needs_client_id: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Canaries:
    ips: tuple[str, ...]
    tokens: tuple[str, ...]  # UUIDs used as ?token= values
    session: str
    bearer: str
    referrer_token: str

    def strings(self) -> list[str]:
        """Every string that must never reach a collector, in every form it could be written."""
        forms: list[str] = ["canary", EMAIL_CANARY, TITLE_CANARY, self.session, self.bearer, self.referrer_token]
        forms += self.tokens
        forms += self.ip_strings()
        return forms

    def ip_strings(self) -> list[str]:
        forms: list[str] = []
        for text in (*self.ips, *SPOOFED_IPS):
            address = ipaddress.ip_address(text)
            forms.append(address.compressed)
            if isinstance(address, ipaddress.IPv6Address):
                forms.append(address.exploded)
                forms.append(":".join(address.exploded.split(":")[4:]))  # the interface identifier alone
        return forms


@dataclasses.dataclass(slots=True)
class Visitor:
    ip: str
    user_agent: str
    language: str
    consent: ConsentState
    gpc: bool
    client_id_cookie: str = ""  # "name=value" of the first-party id cookie once the gateway set one


@dataclasses.dataclass(frozen=True, slots=True)
class Planned:
    rid: str
    kind: str
    visitor: int
    spoof: bool  # a spoofed address in front of the real one, plus X-Real-IP / Forwarded copies
    referrer: Literal["none", "external", "internal"]
    authorization: bool


@dataclasses.dataclass(slots=True)
class Progress:
    """Read by the RSS sampler thread while the traffic runs (plain attribute reads are atomic under the GIL)."""

    completed: int = 0


@dataclasses.dataclass(slots=True)
class TrafficRun:
    planned: int
    results: list[RequestResult]
    expected: dict[str, dict[str, Expect]]
    seconds: float
    canaries: Canaries


def make_canaries(rng: random.Random) -> Canaries:
    def token() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    return Canaries(
        ips=IPV4_CANARIES + IPV6_CANARIES,
        tokens=tuple(token() for _ in range(8)),
        session=f"canary-session-{rng.getrandbits(64):016x}",
        bearer=f"canary-bearer-{rng.getrandbits(64):016x}",
        referrer_token=f"canary-ref-{rng.getrandbits(64):016x}",
    )


def make_visitors(rng: random.Random, canaries: Canaries, count: int = 48) -> list[Visitor]:
    states: tuple[ConsentState, ...] = ("granted", "granted", "refused", "none", "none")
    return [
        Visitor(
            ip=canaries.ips[i % len(canaries.ips)],
            user_agent=BROWSER_USER_AGENTS[i % len(BROWSER_USER_AGENTS)],
            language=LANGUAGES[i % len(LANGUAGES)],
            consent=states[i % len(states)],
            gpc=rng.random() < 0.25,
        )
        for i in range(count)
    ]


def make_plan(rng: random.Random, requests: int, visitors: int) -> list[Planned]:
    kinds = list(MIX)
    weights = [MIX[k] for k in kinds]
    referrers: tuple[Literal["none", "external", "internal"], ...] = ("none", "external", "internal")
    return [
        Planned(
            rid=f"r{n}",
            kind=rng.choices(kinds, weights)[0],
            visitor=rng.randrange(visitors),
            spoof=rng.random() < 0.3,
            referrer=rng.choice(referrers),
            authorization=rng.random() < 0.3,
        )
        for n in range(1, requests + 1)
    ]


def expectation(destination: Destination, visitor: Visitor, *, had_client_id: bool) -> Expect:
    """What one counted event of ``visitor`` may become at ``destination``.

    - consent required and not in effect (none, refused, or granted but overridden by ``Sec-GPC: 1``): MUST_NOT;
    - consent in effect, but the destination identifies browsers by the id cookie and the request had none
      (a beacon before the visitor's first page view): MAY (a policy drop "no client id" is legitimate);
    - no consent needed: MUST, or MAY with GPC (dropping cookieless analytics under GPC is a legitimate policy).
    """
    granted = frozenset({"analytics"}) if visitor.consent == "granted" and not visitor.gpc else frozenset()
    if destination.requires:
        if not destination.requires <= granted:
            return Expect.MUST_NOT
        if destination.needs_client_id and not had_client_id:
            return Expect.MAY
        return Expect.MUST
    return Expect.MAY if visitor.gpc else Expect.MUST


# ---------------------------------------------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------------------------------------------


def _query(canaries: Canaries, n: int) -> str:
    token = canaries.tokens[n % len(canaries.tokens)]
    # utm_* are on the gateway's allowlist and survive; email and token must not.
    return f"utm_source=load&utm_campaign=spring&email=load-canary%40example.org&token={token}"


def _path(planned: Planned, n: int) -> str:
    rid = planned.rid
    kind = planned.kind
    if kind in ("page", "bot", "head", "prefetch"):
        return f"/p/{rid}/downloads"
    if kind == "long":
        return f"/p/{rid}/long-" + "/".join(f"section-{i}-of-a-deep-documentation-tree" for i in range(50))
    if kind == "account":
        return f"/p/{rid}/account"
    if kind == "asset":
        return (f"/static/{rid}/site.css", f"/js/{rid}/app.js", f"/img/{rid}/logo.png")[n % 3]
    if kind == "missing":
        return f"/missing/{rid}"
    if kind == "redirect":
        return f"/old/{rid}"
    raise ValueError(kind)


class _Sender:
    def __init__(
        self,
        origin: str,
        canaries: Canaries,
        visitors: list[Visitor],
        destinations: Sequence[Destination],
        consent_cookies: dict[ConsentState, str],
        client_id_cookie_name: str,
        domain: str,
    ) -> None:
        self.origin = origin
        self.canaries = canaries
        self.visitors = visitors
        self.destinations = destinations
        self.consent_cookies = consent_cookies
        self.client_id_cookie_name = client_id_cookie_name
        self.domain = domain
        self.results: list[RequestResult] = []
        self.expected: dict[str, dict[str, Expect]] = {d.name: {} for d in destinations}

    def _headers(self, planned: Planned, visitor: Visitor, n: int) -> dict[str, str]:
        canaries = self.canaries
        user_agent = BOT_USER_AGENTS[n % len(BOT_USER_AGENTS)] if planned.kind == "bot" else visitor.user_agent
        headers = {
            "user-agent": user_agent,
            "accept-language": visitor.language,
            "x-forwarded-for": f"{SPOOFED_IPS[n % 2]}, {visitor.ip}" if planned.spoof else visitor.ip,
        }
        if planned.spoof:
            headers["x-real-ip"] = visitor.ip
            headers["forwarded"] = f'for="[{visitor.ip}]"' if ":" in visitor.ip else f"for={visitor.ip}"
        cookies = [f"sessionid={canaries.session}"]
        consent = self.consent_cookies.get(visitor.consent)
        if consent:
            cookies.append(consent)
        if visitor.client_id_cookie:
            cookies.append(visitor.client_id_cookie)
        headers["cookie"] = "; ".join(cookies)
        if planned.authorization:
            headers["authorization"] = f"Bearer {canaries.bearer}"
        if visitor.gpc:
            headers["sec-gpc"] = "1"
        token = canaries.tokens[n % len(canaries.tokens)]
        if planned.referrer == "external":
            headers["referer"] = f"https://search.example/q/{canaries.referrer_token}?email=load-canary%40example.org"
        elif planned.referrer == "internal":
            headers["referer"] = f"{self.origin}/account/{EMAIL_CANARY}/settings?token={token}"
        if planned.kind == "prefetch":
            headers["sec-purpose"] = "prefetch"
        return headers

    def _beacon_body(self, planned: Planned, headers: dict[str, str], n: int) -> bytes:
        payload = {
            "n": CUSTOM_EVENTS[n % len(CUSTOM_EVENTS)],
            "u": f"{self.origin}/p/{planned.rid}/signup?{_query(self.canaries, n)}",
            "d": self.domain,
            "r": headers.get("referer"),
            "p": {
                "plan": "pro",
                "source": "https://partner.example/landing?email=load-canary%40example.org",
                "email": EMAIL_CANARY,  # not an allowed prop: must be dropped
            },
        }
        return json.dumps(payload).encode()

    async def send(self, client: httpx.AsyncClient, planned: Planned) -> None:
        n = int(planned.rid[1:])
        visitor = self.visitors[planned.visitor]
        had_client_id = bool(visitor.client_id_cookie)
        headers = self._headers(planned, visitor, n)
        started = time.perf_counter()
        try:
            if planned.kind == "beacon":
                headers |= {"content-type": "text/plain", "origin": self.origin, "sec-fetch-site": "same-origin"}
                body = self._beacon_body(planned, headers, n)
                response = await client.post("/api/event", content=body, headers=headers)
            else:
                method = "HEAD" if planned.kind == "head" else "GET"
                headers["accept"] = "text/html,*/*;q=0.8"
                url = f"{_path(planned, n)}?{_query(self.canaries, n)}"
                response = await client.request(method, url, headers=headers)
        except httpx.HTTPError as exc:
            self.results.append(RequestResult(planned.rid, planned.kind, 0, time.perf_counter() - started,
                                              exc.__class__.__name__))  # fmt: skip
            return
        seconds = time.perf_counter() - started
        self.results.append(RequestResult(planned.rid, planned.kind, response.status_code, seconds))
        self._remember_client_id(visitor, response)
        if self._counts(planned, response):
            for destination in self.destinations:
                self.expected[destination.name][planned.rid] = expectation(
                    destination, visitor, had_client_id=had_client_id or planned.kind != "beacon"
                )

    @staticmethod
    def _counts(planned: Planned, response: httpx.Response) -> bool:
        if planned.kind == "beacon":
            return response.status_code == 202 and "x-plausible-dropped" not in response.headers
        content_type = response.headers.get("content-type", "")
        return planned.kind in PAGE_KINDS and response.status_code == 200 and content_type.startswith("text/html")

    def _remember_client_id(self, visitor: Visitor, response: httpx.Response) -> None:
        prefix = self.client_id_cookie_name + "="
        for value in response.headers.get_list("set-cookie"):
            if value.startswith(prefix):
                pair = value.split(";", 1)[0]
                visitor.client_id_cookie = "" if pair == prefix else pair


async def _consent_cookie(
    client: httpx.AsyncClient, origin: str, prefix: str, cookie_name: str, granted: bool, ip: str
) -> str:
    """A real signed consent cookie ("name=value") from the gateway's consent API."""
    response = await client.post(
        f"{prefix}/consent",
        json={"categories": {"analytics": granted}},
        headers={
            "sec-fetch-site": "same-origin",
            "origin": origin,
            "x-forwarded-for": ip,
            "user-agent": BROWSER_USER_AGENTS[0],
        },
    )
    if response.status_code not in (200, 204):
        raise RuntimeError(f"POST {prefix}/consent answered {response.status_code}: {response.text[:200]}")
    for value in response.headers.get_list("set-cookie"):
        if value.startswith(cookie_name + "="):
            return value.split(";", 1)[0]
    raise RuntimeError(f"POST {prefix}/consent set no {cookie_name} cookie")


async def run_traffic(
    base_url: str,
    destinations: Sequence[Destination],
    *,
    requests: int = 3000,
    concurrency: int = 32,
    deadline: float = 60.0,
    seed: int = 20241004,
    domain: str = "load.example",
    prefix: str = "/_privacy",
    consent_cookie: str = "__Host-consent",
    client_id_cookie: str = "__Host-gw_cid",
    progress: Progress | None = None,
) -> TrafficRun:
    """Send the seeded plan; stop starting requests ``deadline`` seconds after the first one."""
    rng = random.Random(seed)
    canaries = make_canaries(rng)
    visitors = make_visitors(rng, canaries)
    plan = make_plan(rng, requests, len(visitors))
    progress = progress if progress is not None else Progress()
    origin = base_url.rstrip("/")

    def new_client() -> httpx.AsyncClient:
        # One client per worker with a single keep-alive connection: httpcore's pool scans every connection for
        # every request, which with one shared 32-connection pool cost the generator more CPU than the gateway.
        # Cookies are set per request from each visitor's own state, so the client's jar must stay empty.
        return httpx.AsyncClient(
            base_url=base_url,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(15.0),
            trust_env=False,
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )

    async with new_client() as client:
        cookies: dict[ConsentState, str] = {
            "granted": await _consent_cookie(client, origin, prefix, consent_cookie, True, canaries.ips[0]),
            "refused": await _consent_cookie(client, origin, prefix, consent_cookie, False, canaries.ips[1]),
        }
    sender = _Sender(origin, canaries, visitors, destinations, cookies, client_id_cookie, domain)
    queue = iter(plan)
    started = time.perf_counter()
    stop_at = started + deadline

    async def worker() -> None:
        async with new_client() as client:
            for planned in queue:
                if time.perf_counter() >= stop_at:
                    return
                await sender.send(client, planned)
                progress.completed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return TrafficRun(
        planned=len(plan), results=sender.results, expected=sender.expected, seconds=seconds, canaries=canaries
    )
