// smoke: the contract through the load balancer, in about 10 seconds.
//
// 1. `contract` (one VU, once): a cold key is a MISS, then a HIT with the same token and an
//    `expires_in` no higher; body credentials hit the Basic entry; scope order and duplicates
//    do not matter; `Cache-Control: no-cache` from the client does not bust the cache; every
//    token answer has Cache-Control: no-store and Pragma: no-cache; a wrong secret gets
//    mock-idp's 400 invalid_client and never a token; a malformed request gets a 4xx OAuth
//    JSON error without reaching the upstream.
// 2. `steady` (4 VUs, 8 s): hits on three warm keys.
// Teardown: mock-idp issued exactly one token per key this run used (3 for demo-client,
// 3 for orders-service).
//
//   loadtest/run test loadtest/smoke.js
//   docker compose run --rm k6 run /scripts/smoke.js

import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter } from 'k6/metrics';
import {
    IDP_ADMIN_URL, TOKEN_URL, TREND_STATS, checkToken, idpStats, issuedDelta, json, newRunId, postToken, xCache,
} from './lib/common.js';

const demo = { id: 'demo-client', secret: 'demo-secret' };
const orders = { id: 'orders-service', secret: 'orders-secret' };

const unexpectedIssues = new Counter('upstream_tokens_unexpected');
const tokensIssued = new Counter('upstream_tokens_issued');

export const options = {
    scenarios: {
        contract: { executor: 'shared-iterations', vus: 1, iterations: 1, exec: 'contract', maxDuration: '20s' },
        steady: { executor: 'constant-vus', vus: 4, duration: '8s', startTime: '1s', exec: 'steady' },
    },
    thresholds: {
        checks: ['rate==1'],
        http_req_failed: ['rate==0'],
        'http_req_duration{scenario:steady}': ['p(95)<100'],
        upstream_tokens_unexpected: ['count==0'],
    },
    summaryTrendStats: TREND_STATS,
};

export function setup() {
    const res = http.get(`${IDP_ADMIN_URL}/admin/stats`);
    if (res.status !== 200) throw new Error(`mock-idp admin API not reachable at ${IDP_ADMIN_URL}`);
    return { run: newRunId(), before: res.json() };
}

const tokenHeaders = (res) => ({
    'Cache-Control: no-store': () => (res.headers['Cache-Control'] || '').toLowerCase() === 'no-store',
    'Pragma: no-cache': () => (res.headers['Pragma'] || '').toLowerCase() === 'no-cache',
    'JSON content type': () => (res.headers['Content-Type'] || '').startsWith('application/json'),
});

const allow4xx = http.expectedStatuses({ min: 400, max: 499 });

export function contract(data) {
    const meta = JSON.stringify({ smoke: data.run });

    // A cold key: MISS, then HIT with the same token.
    const first = postToken(demo, { extra: { aws_client_metadata: meta } });
    checkToken(first, 'first');
    check(first, { 'first: X-Cache MISS': (r) => xCache(r) === 'MISS', ...tokenHeaders(first) });
    const firstBody = json(first) || {};

    sleep(1.1);
    const second = postToken(demo, { extra: { aws_client_metadata: meta } });
    checkToken(second, 'second');
    const secondBody = json(second) || {};
    check(second, {
        'second: X-Cache HIT': (r) => xCache(r) === 'HIT',
        'second: same access_token': () => secondBody.access_token === firstBody.access_token,
        'second: expires_in counts down': () => secondBody.expires_in < firstBody.expires_in,
        ...tokenHeaders(second),
    });

    // The same credentials in the body: the same entry.
    const body = postToken(demo, { auth: 'body', extra: { aws_client_metadata: meta } });
    checkToken(body, 'body credentials');
    check(body, {
        'body credentials: X-Cache HIT': (r) => xCache(r) === 'HIT',
        'body credentials: same access_token': (r) => (json(r) || {}).access_token === firstBody.access_token,
    });

    // Client cache directives are ignored.
    const busting = postToken(demo, { extra: { aws_client_metadata: meta }, headers: { 'Cache-Control': 'no-cache', Pragma: 'no-cache' } });
    check(busting, { 'Cache-Control: no-cache is ignored (HIT)': (r) => xCache(r) === 'HIT' });

    // Scope is a set: order and duplicates do not make a new key.
    const scoped = postToken(demo, { extra: { aws_client_metadata: meta, scope: 'api/read api/write' } });
    checkToken(scoped, 'scoped');
    check(scoped, { 'scoped: X-Cache MISS': (r) => xCache(r) === 'MISS' });
    const reordered = postToken(demo, { extra: { aws_client_metadata: meta, scope: 'api/write api/read api/write' } });
    check(reordered, {
        'reordered scope: X-Cache HIT': (r) => xCache(r) === 'HIT',
        'reordered scope: same access_token': (r) => (json(r) || {}).access_token === (json(scoped) || {}).access_token,
    });

    // A narrower scope set is another key.
    const narrow = postToken(demo, { extra: { aws_client_metadata: meta, scope: 'api/read' } });
    checkToken(narrow, 'narrower scope');
    check(narrow, { 'narrower scope: X-Cache MISS': (r) => xCache(r) === 'MISS' });

    // A wrong secret: the upstream's answer, passed through; never the cached token.
    const wrong = postToken({ id: demo.id, secret: 'not-the-secret' }, { extra: { aws_client_metadata: meta }, expected: allow4xx });
    const wrongBody = json(wrong) || {};
    check(wrong, {
        'wrong secret: 400': (r) => r.status === 400,
        'wrong secret: invalid_client': () => wrongBody.error === 'invalid_client',
        'wrong secret: no access_token': () => wrongBody.access_token === undefined,
    });

    // Malformed requests: a 4xx OAuth error from the proxy itself, no upstream call.
    const asJson = http.post(TOKEN_URL, JSON.stringify({ grant_type: 'client_credentials' }), {
        headers: { 'Content-Type': 'application/json' },
        responseCallback: allow4xx,
        tags: { name: 'POST /oauth2/token (malformed)' },
    });
    check(asJson, {
        'JSON body: 4xx': (r) => r.status >= 400 && r.status < 500,
        'JSON body: OAuth error': (r) => typeof (json(r) || {}).error === 'string',
    });
    const twoMethods = postToken(demo, { auth: 'basic', extra: { client_id: demo.id, client_secret: demo.secret }, expected: allow4xx });
    check(twoMethods, {
        'two authentication methods: 400 invalid_request': (r) => r.status === 400 && (json(r) || {}).error === 'invalid_request',
    });
    const getToken = http.get(TOKEN_URL, { responseCallback: allow4xx, tags: { name: 'GET /oauth2/token' } });
    check(getToken, { 'GET: 4xx': (r) => r.status >= 400 && r.status < 500 });
}

export function steady(data) {
    const meta = JSON.stringify({ smoke: data.run, part: 'steady' });
    for (const scope of ['orders/read', 'orders/write', 'orders/read orders/write']) {
        const res = postToken(orders, { extra: { aws_client_metadata: meta, scope } });
        checkToken(res, 'steady');
        check(res, { 'steady: served (HIT, MISS or COALESCED)': (r) => ['HIT', 'MISS', 'COALESCED'].includes(xCache(r)) });
    }
    sleep(0.05);
}

export function teardown(data) {
    const after = idpStats();
    const demoIssued = issuedDelta(data.before, after, demo.id);
    const ordersIssued = issuedDelta(data.before, after, orders.id);
    tokensIssued.add(after.issued_total - data.before.issued_total);
    // demo-client: three keys (no scope, the full scope set, api/read); orders-service: three.
    const ok = check(null, {
        'mock-idp issued exactly 3 tokens to demo-client': () => demoIssued === 3,
        'mock-idp issued exactly 3 tokens to orders-service': () => ordersIssued === 3,
    });
    unexpectedIssues.add(ok ? 0 : Math.abs(demoIssued - 3) + Math.abs(ordersIssued - 3));
    console.log(`mock-idp issued ${demoIssued} token(s) to demo-client and ${ordersIssued} to orders-service this run`);
}
