// expiry-storm: short-lived tokens for many keys that all expire together, under steady load.
//
// Setup shortens mock-idp's token lifetime to LIFETIME seconds (POST /admin/faults; put back in
// teardown) and warms KEYS cold keys in one burst, so they all stop being fresh at the same
// moment, LIFETIME - FRESH_CUTOFF seconds later (FRESH_CUTOFF = max(TOKEN_PROXY_EXPIRY_MARGIN,
// TOKEN_PROXY_MIN_TOKEN_TTL) = 60 s in deploy/token-proxy.env; a lifetime at or below it is
// never cached at all). `load` then sends RATE requests per second over those keys for DURATION;
// `monitor` reads mock-idp's counters every second.
// Asserts: no failed request; no token served with less than MIN_TTL seconds left; mock-idp's
// issue rate never exceeds one token per key per second (MAX_UPSTREAM_PER_SECOND), and over
// the run at most one token per key per fresh period (+1), i.e. the storms cost one upstream
// call per key each, whatever the request rate.
//
//   loadtest/run test loadtest/expiry-storm.js
//   docker compose run --rm k6 run /scripts/expiry-storm.js
//
// KEYS [100], RATE [500], DURATION [65s], LIFETIME [75], FRESH_CUTOFF [60], MIN_TTL [30],
// MAX_UPSTREAM_PER_SECOND [KEYS]

import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import {
    arrivalRate, TREND_STATS, checkToken, envInt, idpFaults, idpStats, issuedDelta, json, loadClient, newRunId, postToken,
    tokenRequest, xCache,
} from './lib/common.js';

const KEYS = envInt('KEYS', 100);
const RATE = envInt('RATE', 500);
const DURATION = __ENV.DURATION || '65s';
const LIFETIME = envInt('LIFETIME', 75);
const FRESH_CUTOFF = envInt('FRESH_CUTOFF', 60);
const MIN_TTL = envInt('MIN_TTL', 30);
const MAX_PER_SECOND = envInt('MAX_UPSTREAM_PER_SECOND', KEYS);
if (LIFETIME <= FRESH_CUTOFF) throw new Error(`LIFETIME (${LIFETIME}) must exceed FRESH_CUTOFF (${FRESH_CUTOFF}) or nothing is cached`);
if (KEYS < 1 || KEYS > 1000) throw new Error('KEYS must be 1..1000');

const durationSeconds = (() => {
    const m = /^(\d+)(s|m)$/.exec(DURATION);
    if (!m) throw new Error('DURATION must look like 65s or 2m');
    return Number(m[1]) * (m[2] === 'm' ? 60 : 1);
})();
const FRESH_SECONDS = LIFETIME - FRESH_CUTOFF;
// Generations of each key: the warm-up, then one per fresh period of the run.
const MAX_PER_KEY = Math.ceil((durationSeconds + 5) / FRESH_SECONDS) + 1;

const perSecond = new Trend('upstream_tokens_per_second');
const tokensIssued = new Counter('upstream_tokens_issued');
const overIssued = new Counter('upstream_tokens_unexpected');
const nearExpiry = new Counter('served_below_min_ttl');
const misses = new Counter('x_cache_miss');

export const options = {
    scenarios: {
        load: arrivalRate(RATE, DURATION, { exec: 'load' }),
        monitor: {
            executor: 'constant-arrival-rate',
            rate: 1,
            timeUnit: '1s',
            duration: DURATION,
            preAllocatedVUs: 1,
            maxVUs: 1,
            exec: 'monitor',
        },
    },
    thresholds: {
        checks: ['rate==1'],
        http_req_failed: ['rate==0'],
        served_below_min_ttl: ['count==0'],
        upstream_tokens_unexpected: ['count==0'],
        upstream_tokens_per_second: [`max<=${MAX_PER_SECOND}`],
        'http_req_duration{scenario:load}': ['p(99)<250'],
        dropped_iterations: [`rate<${RATE / 100}`],
    },
    summaryTrendStats: TREND_STATS,
};

export function setup() {
    const original = idpFaults().token_lifetime_secs;
    idpFaults({ token_lifetime_secs: LIFETIME });
    const before = idpStats();
    const run = newRunId();
    const meta = JSON.stringify({ storm: run });
    // Warm every key in one burst: they expire together.
    const responses = http.batch([...Array(KEYS).keys()].map((k) => tokenRequest(loadClient(k), { extra: { aws_client_metadata: meta } })));
    responses.forEach((r) => checkToken(r, 'warm-up'));
    const lifetimes = responses.map((r) => (json(r) || {}).expires_in);
    console.log(`token lifetime ${LIFETIME}s (was ${original}s); ${KEYS} keys warmed with expires_in ${Math.min(...lifetimes)}..${Math.max(...lifetimes)}; ` +
        `each is fresh for ~${FRESH_SECONDS}s, so a storm every ${FRESH_SECONDS}s; at most ${MAX_PER_KEY} tokens per key`);
    return { original, before, meta, last: before.issued_total };
}

export function load(data) {
    const k = Math.floor(Math.random() * KEYS);
    const res = postToken(loadClient(k), { auth: Math.random() < 0.5 ? 'basic' : 'body', extra: { aws_client_metadata: data.meta } });
    checkToken(res);
    const body = json(res) || {};
    if (res.status === 200 && body.expires_in < MIN_TTL) nearExpiry.add(1);
    if (xCache(res) === 'MISS') misses.add(1);
}

let lastIssued = null;
export function monitor(data) {
    const now = idpStats().issued_total;
    if (lastIssued === null) lastIssued = data.last;
    perSecond.add(now - lastIssued);
    lastIssued = now;
}

export function teardown(data) {
    idpFaults({ token_lifetime_secs: data.original });
    const after = idpStats();
    let extra = 0;
    for (let k = 0; k < KEYS; k++) {
        const n = issuedDelta(data.before, after, loadClient(k).id);
        if (n > MAX_PER_KEY) extra += n - MAX_PER_KEY;
    }
    const total = after.issued_total - data.before.issued_total;
    tokensIssued.add(total);
    overIssued.add(extra);
    check(null, { [`at most ${MAX_PER_KEY} tokens per key`]: () => extra === 0 });
    console.log(`mock-idp issued ${total} token(s) for ${KEYS} keys (cap ${KEYS * MAX_PER_KEY}); lifetime restored to ${data.original}s`);
    sleep(0);
}
