// hot-hits: a steady high rate on a few warm keys; latency thresholds.
//
// Setup warms KEYS keys (the example clients of deploy/mock-idp.env, then load-client-i), then
// `hits` sends RATE requests per second for DURATION, spread over those keys at random, half
// with Basic and half with body credentials. Every answer must be a 200 served without an
// upstream call (HIT or COALESCED), within the latency thresholds, and mock-idp must issue no
// token during the run (a background refresh of a key warmed long ago is allowed, one per key).
//
//   loadtest/run test loadtest/hot-hits.js [-e RATE=1500 -e DURATION=30s]
//   docker compose run --rm k6 run /scripts/hot-hits.js
//
// RATE [1000] requests/s, DURATION [30s], KEYS [5], P95_MS [15], P99_MS [40]
// (k6 itself uses about one core at 1,000 requests/s; throughput figures come from bench/, wrk.)

import { check, sleep } from 'k6';
import { Counter, Rate } from 'k6/metrics';
import {arrivalRate, TREND_STATS, checkToken, envInt, idpStats, issuedDelta, loadClient, postToken, xCache } from './lib/common.js';

const RATE = envInt('RATE', 1000);
const DURATION = __ENV.DURATION || '30s';
const KEYS = envInt('KEYS', 5);
const P95_MS = envInt('P95_MS', 15);
const P99_MS = envInt('P99_MS', 40);

const EXAMPLES = [
    { id: 'demo-client', secret: 'demo-secret' },
    { id: 'orders-service', secret: 'orders-secret' },
    { id: 'billing-service', secret: 'billing-secret' },
    { id: 'reporting-job', secret: 'reporting-secret' },
];
const CLIENTS = [...Array(KEYS).keys()].map((i) => (i < EXAMPLES.length ? EXAMPLES[i] : loadClient(i)));

const avoided = new Rate('served_without_upstream');
const tokensIssued = new Counter('upstream_tokens_issued');
const unexpected = new Counter('upstream_tokens_unexpected');

export const options = {
    scenarios: {
        hits: arrivalRate(RATE, DURATION),
    },
    thresholds: {
        checks: ['rate==1'],
        http_req_failed: ['rate==0'],
        served_without_upstream: ['rate==1'],
        upstream_tokens_unexpected: ['count==0'],
        'http_req_duration{scenario:hits}': [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
        // k6 shares the machine: tolerate under 1% of the planned requests not being sent.
        dropped_iterations: [`rate<${RATE / 100}`],
    },
    summaryTrendStats: TREND_STATS,
};

export function setup() {
    // Warm every key, then let every replica see it (L1) a few times.
    for (const client of CLIENTS) {
        checkToken(postToken(client), 'warm-up');
    }
    for (let i = 0; i < 6; i++) {
        for (const client of CLIENTS) postToken(client);
    }
    sleep(0.5);
    return { before: idpStats() };
}

export default function () {
    const client = CLIENTS[Math.floor(Math.random() * CLIENTS.length)];
    const res = postToken(client, { auth: Math.random() < 0.5 ? 'basic' : 'body' });
    checkToken(res);
    const cache = xCache(res);
    avoided.add(cache === 'HIT' || cache === 'COALESCED');
}

export function teardown(data) {
    const after = idpStats();
    let issued = 0;
    let tooMany = 0;
    for (const client of CLIENTS) {
        const n = issuedDelta(data.before, after, client.id);
        issued += n;
        if (n > 1) tooMany += n - 1;
    }
    tokensIssued.add(after.issued_total - data.before.issued_total);
    unexpected.add(tooMany);
    check(null, { 'at most one (refresh) token per key during the run': () => tooMany === 0 });
    console.log(`mock-idp issued ${issued} token(s) to the ${KEYS} hot clients during the run`);
}
