// Shared by the k6 scripts of loadtest/: where to send requests, how to build token requests,
// and how to read mock-idp's counters.
//
// BASE_URL       HAProxy in front of the replicas   [http://127.0.0.1:8080]
// IDP_ADMIN_URL  mock-idp, for /admin/*             [http://127.0.0.1:9000]
// IDP2_ADMIN_URL the second pool's mock-idp (two-pools.js; docker-compose.pools.yml, POOLS=2)
//                                                    [http://127.0.0.1:9001]
// (loadtest/run sets both; docker-compose.yml sets them for its k6 service; the defaults are
// the compose stack's published ports, for k6 run from the host.)

import http from 'k6/http';
import encoding from 'k6/encoding';
import exec from 'k6/execution';
import { check, sleep } from 'k6';

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
export const IDP_ADMIN_URL = (__ENV.IDP_ADMIN_URL || 'http://127.0.0.1:9000').replace(/\/+$/, '');
export const IDP2_ADMIN_URL = (__ENV.IDP2_ADMIN_URL || 'http://127.0.0.1:9001').replace(/\/+$/, '');
export const TOKEN_URL = `${BASE_URL}/oauth2/token`;

// Percentiles shown in every end-of-test summary.
export const TREND_STATS = ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max', 'count'];

// Cognito's price per machine-to-machine token request (USD), for the summaries.
export const PRICE_PER_TOKEN = 0.00225;

/** A k6 scenario sending `rate` requests a second for `duration`, whatever the latency. */
export function arrivalRate(rate, duration, { maxVUs = 400, ...rest } = {}) {
    return {
        executor: 'constant-arrival-rate',
        rate,
        timeUnit: '1s',
        duration,
        preAllocatedVUs: Math.min(100, maxVUs),
        maxVUs,
        ...rest,
    };
}

/**
 * A herd: each of `vus` VUs runs `rounds` iterations, every VU's round r starting at the same
 * instant (`waitForRound`), `gapMs` apart.
 */
export function herdRounds(vus, rounds, gapMs) {
    return {
        executor: 'per-vu-iterations',
        vus,
        iterations: rounds,
        maxDuration: `${Math.ceil((rounds * gapMs) / 1000) + 60}s`,
    };
}

/** Sleeps until this VU's current round of a `herdRounds` scenario starts; returns the round. */
export function waitForRound(start, gapMs) {
    const round = exec.vu.iterationInScenario;
    const wait = start + round * gapMs - Date.now();
    if (wait > 0) sleep(wait / 1000);
    return round;
}

export function envInt(name, fallback) {
    const raw = __ENV[name];
    if (raw === undefined || raw === '') return fallback;
    const value = Number(raw);
    if (!Number.isInteger(value) || value < 0) throw new Error(`${name} must be a whole number, got ${raw}`);
    return value;
}

export function envFloat(name, fallback) {
    const raw = __ENV[name];
    if (raw === undefined || raw === '') return fallback;
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new Error(`${name} must be a number, got ${raw}`);
    return value;
}

// The generated load-test clients of deploy/mock-idp.env (MOCK_IDP_GENERATED_CLIENTS=1000).
export function loadClient(i) {
    return { id: `load-client-${i}`, secret: `load-secret-${i}` };
}

// A tag unique to this run, so a script's keys are cold even against a long-running stack.
export function newRunId() {
    return `${Date.now().toString(36)}-${Math.floor(Math.random() * 1e9).toString(36)}`;
}

function formEncode(params) {
    return Object.keys(params)
        .filter((k) => params[k] !== undefined && params[k] !== null)
        .map((k) => `${encodeURIComponent(k)}=${encodeURIComponent(params[k])}`.replace(/%20/g, '+'))
        .join('&');
}

// RFC 6749 §2.3.1: id and secret are form-urlencoded before base64.
export function basicAuth(client) {
    const enc = (s) => encodeURIComponent(s).replace(/%20/g, '+');
    return `Basic ${encoding.b64encode(`${enc(client.id)}:${enc(client.secret)}`)}`;
}

// The arguments of one token request: [method, url, body, params], for http.request and
// http.batch alike. `auth` is 'basic' (client_secret_basic) or 'body' (client_secret_post);
// `extra` adds parameters such as scope or aws_client_metadata (all part of the cache key);
// `path` is the route, e.g. '/partners/oauth2/token' for a named upstream.
export function tokenRequest(client, { auth = 'basic', extra = {}, tags = {}, headers = {}, expected, path = '/oauth2/token' } = {}) {
    const params = { grant_type: 'client_credentials', ...extra };
    const reqHeaders = { 'Content-Type': 'application/x-www-form-urlencoded', ...headers };
    if (auth === 'basic') {
        reqHeaders.Authorization = basicAuth(client);
    } else {
        params.client_id = client.id;
        params.client_secret = client.secret;
    }
    const p = { headers: reqHeaders, tags: { name: 'POST /oauth2/token', ...tags } };
    if (expected) p.responseCallback = expected;
    return ['POST', `${BASE_URL}${path}`, formEncode(params), p];
}

export function postToken(client, opts) {
    const [method, url, body, params] = tokenRequest(client, opts);
    return http.request(method, url, body, params);
}

export function json(res) {
    try {
        return res.json();
    } catch (e) {
        return null;
    }
}

// Whether `res` is a good token response; records checks named after `what`.
export function checkToken(res, what = 'token') {
    const body = json(res);
    return check(res, {
        [`${what}: status 200`]: (r) => r.status === 200,
        [`${what}: access_token`]: () => body !== null && typeof body.access_token === 'string' && body.access_token.length > 0,
        [`${what}: expires_in > 0`]: () => body !== null && Number.isInteger(body.expires_in) && body.expires_in > 0,
    });
}

// X-Cache of a response: HIT, MISS, COALESCED, STALE, BYPASS or '' when absent.
export function xCache(res) {
    return (res.headers['X-Cache'] || '').toUpperCase();
}

// mock-idp's counters: {requests_total, issued_total, issued: {client_id: n}}.
export function idpStats(adminUrl = IDP_ADMIN_URL) {
    const res = http.get(`${adminUrl}/admin/stats`, { tags: { name: 'mock-idp /admin/stats' } });
    if (res.status !== 200) throw new Error(`GET ${adminUrl}/admin/stats answered ${res.status}: is the mock-idp admin URL right?`);
    return res.json();
}

// The claims of a JWT access token (its payload, not verified: only to read `iss`), or null.
export function jwtClaims(token) {
    try {
        return JSON.parse(encoding.b64decode(token.split('.')[1], 'rawurl', 's'));
    } catch (e) {
        return null;
    }
}

export function idpFaults(update) {
    const url = `${IDP_ADMIN_URL}/admin/faults`;
    const res = update === undefined
        ? http.get(url, { tags: { name: 'mock-idp /admin/faults' } })
        : http.post(url, JSON.stringify(update), { tags: { name: 'mock-idp /admin/faults' } });
    if (res.status !== 200) throw new Error(`${url} answered ${res.status}: ${res.body}`);
    return res.json();
}

// Tokens issued per client between two snapshots.
export function issuedDelta(before, after, clientId) {
    return ((after.issued || {})[clientId] || 0) - ((before.issued || {})[clientId] || 0);
}

// Zipf-like sampler over 0..n-1: rank r is drawn with weight 1 / (r + 1)^s.
export function zipfSampler(n, s) {
    const cdf = new Float64Array(n);
    let total = 0;
    for (let r = 0; r < n; r++) {
        total += 1 / Math.pow(r + 1, s);
        cdf[r] = total;
    }
    return () => {
        const u = Math.random() * total;
        let lo = 0;
        let hi = n - 1;
        while (lo < hi) {
            const mid = (lo + hi) >> 1;
            if (cdf[mid] < u) lo = mid + 1;
            else hi = mid;
        }
        return lo;
    };
}

export function shuffle(items) {
    const a = items.slice();
    for (let i = a.length - 1; i > 0; i--) {
        const j = Math.floor(Math.random() * (i + 1));
        [a[i], a[j]] = [a[j], a[i]];
    }
    return a;
}
