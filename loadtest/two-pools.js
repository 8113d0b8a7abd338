// two-pools: a thundering herd spread over two user pools behind one deployment.
//
// Needs the two-pool stack: `POOLS=2 loadtest/run test loadtest/two-pools.js`, or
// `docker compose -f docker-compose.yml -f docker-compose.pools.yml run --rm k6 run /scripts/two-pools.js`.
// Its upstreams (deploy/pools.toml): "orders" (mock-idp, also the default /oauth2/token) and
// "partners" (mock-idp-partners), both knowing the same load-test clients.
//
// ROUNDS times, every VU waits for the same instant and then sends, all at once, for each of
// KEYS cold keys one request to each pool: the orders pool by /orders/oauth2/token or by the
// default route /oauth2/token (chosen per request; both share the pool's entries), the partners
// pool by /partners/oauth2/token. The same credentials go to both pools, so every token is
// checked to come from the pool its route names (its `iss` claim). Teardown reads both pools'
// /admin/stats: each must have issued exactly ROUNDS tokens to each of the KEYS clients (one
// per key per pool per round) and none to anyone else, or the run fails.
//
// VUS [50], KEYS [10], ROUNDS [3], ROUND_GAP_MS [3000], OFFSET [0] (clients OFFSET..OFFSET+KEYS-1),
// ORDERS_ISSUER [http://localhost/mock-idp], PARTNERS_ISSUER [http://localhost/mock-idp-partners]

import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter } from 'k6/metrics';
import {
    IDP2_ADMIN_URL, IDP_ADMIN_URL, TREND_STATS, envInt, herdRounds, idpStats, issuedDelta, json, jwtClaims, loadClient,
    newRunId, shuffle, tokenRequest, waitForRound,
} from './lib/common.js';

const VUS = envInt('VUS', 50);
const KEYS = envInt('KEYS', 10);
const ROUNDS = envInt('ROUNDS', 3);
const GAP_MS = envInt('ROUND_GAP_MS', 3000);
const OFFSET = envInt('OFFSET', 0);
if (KEYS < 1 || OFFSET + KEYS > 1000) throw new Error('KEYS and OFFSET must stay within load-client-0..999');

const POOLS = {
    orders: { adminUrl: IDP_ADMIN_URL, issuer: __ENV.ORDERS_ISSUER || 'http://localhost/mock-idp' },
    partners: { adminUrl: IDP2_ADMIN_URL, issuer: __ENV.PARTNERS_ISSUER || 'http://localhost/mock-idp-partners' },
};

const crossed = new Counter('pool_crossings');
const keyViolations = new Counter('pool_key_violations');

export const options = {
    scenarios: {
        herd: herdRounds(VUS, ROUNDS, GAP_MS),
    },
    batch: 2 * KEYS,
    batchPerHost: 2 * KEYS,
    thresholds: {
        checks: ['rate==1'],
        http_req_failed: ['rate==0'],
        pool_crossings: ['count==0'],
        pool_key_violations: ['count==0'],
    },
    summaryTrendStats: TREND_STATS,
};

export function setup() {
    if (IDP_ADMIN_URL === IDP2_ADMIN_URL) throw new Error('IDP_ADMIN_URL and IDP2_ADMIN_URL name the same mock-idp');
    const before = {};
    for (const [name, pool] of Object.entries(POOLS)) {
        before[name] = idpStats(pool.adminUrl);
    }
    return { run: newRunId(), before, start: Date.now() + 2000 };
}

export default function (data) {
    const round = waitForRound(data.start, GAP_MS);

    const meta = JSON.stringify({ pools: data.run, round });
    const sent = [];
    for (const k of shuffle([...Array(KEYS).keys()])) {
        for (const pool of shuffle(['orders', 'partners'])) {
            const path = pool === 'partners' ? '/partners/oauth2/token'
                : Math.random() < 0.5 ? '/orders/oauth2/token' : '/oauth2/token';
            sent.push({ pool, request: tokenRequest(loadClient(OFFSET + k), { path, extra: { aws_client_metadata: meta }, tags: { name: `POST ${path}` } }) });
        }
    }
    const responses = http.batch(sent.map((s) => s.request));
    responses.forEach((res, i) => {
        const body = json(res);
        const claims = body && typeof body.access_token === 'string' ? jwtClaims(body.access_token) : null;
        const fromItsPool = claims !== null && claims.iss === POOLS[sent[i].pool].issuer;
        if (res.status === 200 && !fromItsPool) crossed.add(1);
        check(res, {
            'status 200': (r) => r.status === 200,
            'token from the pool the route names': () => fromItsPool,
        });
    });
}

export function teardown(data) {
    sleep(1);
    let violations = 0;
    const report = [];
    for (const [name, pool] of Object.entries(POOLS)) {
        const after = idpStats(pool.adminUrl);
        const wrong = [];
        for (let k = 0; k < KEYS; k++) {
            const id = loadClient(OFFSET + k).id;
            const issued = issuedDelta(data.before[name], after, id);
            if (issued !== ROUNDS) wrong.push(`${id}: ${issued}`);
            violations += Math.abs(issued - ROUNDS);
        }
        const total = after.issued_total - data.before[name].issued_total;
        if (total !== KEYS * ROUNDS) violations += Math.abs(total - KEYS * ROUNDS);
        check(null, {
            [`${name}: exactly one token per key per round`]: () => wrong.length === 0,
            [`${name}: no other token`]: () => total === KEYS * ROUNDS,
        });
        report.push(`${name} issued ${total} (expected ${KEYS * ROUNDS})${wrong.length ? `, wrong: ${wrong.join(', ')}` : ''}`);
    }
    keyViolations.add(violations);
    console.log(`${VUS} VUs x ${KEYS} keys x 2 pools x ${ROUNDS} rounds = ${VUS * KEYS * 2 * ROUNDS} requests; ${report.join('; ')}`);
}
