// many-clients: a skewed (Zipf-like) mix over 1,000 clients, the shape of a real fleet where a
// few services call often and most rarely.
//
// Client rank r (load-client-r of deploy/mock-idp.env, MOCK_IDP_GENERATED_CLIENTS=1000) is
// drawn with weight 1/(r+1)^ZIPF_S; RATE requests per second for DURATION, with Basic or body
// credentials at random (the same key either way). Thresholds: no failed request, latency, and
// most answers served without an upstream call. Teardown: mock-idp issued at most one token per
// client during the run (tokens live an hour) — the cache holds 1,000 keys at once.
//
//   loadtest/run test loadtest/many-clients.js [-e RATE=800 -e DURATION=30s -e ZIPF_S=1.1]
//   docker compose run --rm k6 run /scripts/many-clients.js
//
// RATE [800] requests/s, DURATION [30s], CLIENTS [1000], ZIPF_S [1.1], P95_MS [25], P99_MS [100],
// MIN_HIT_RATIO [0.9]

import { check } from 'k6';
import { Counter, Rate } from 'k6/metrics';
import {
    arrivalRate, TREND_STATS, checkToken, envFloat, envInt, idpStats, issuedDelta, loadClient, postToken, xCache, zipfSampler,
} from './lib/common.js';

const RATE = envInt('RATE', 800);
const DURATION = __ENV.DURATION || '30s';
const CLIENTS = envInt('CLIENTS', 1000);
const ZIPF_S = envFloat('ZIPF_S', 1.1);
const P95_MS = envInt('P95_MS', 25);
const P99_MS = envInt('P99_MS', 100);
const MIN_HIT_RATIO = envFloat('MIN_HIT_RATIO', 0.9);
if (CLIENTS < 1 || CLIENTS > 1000) throw new Error('CLIENTS must be 1..1000 (the generated clients of mock-idp)');

const pick = zipfSampler(CLIENTS, ZIPF_S);
const avoided = new Rate('served_without_upstream');
const tokensIssued = new Counter('upstream_tokens_issued');
const clientsIssued = new Counter('clients_issued_a_token');
const overIssued = new Counter('upstream_tokens_unexpected');

export const options = {
    scenarios: {
        fleet: arrivalRate(RATE, DURATION),
    },
    thresholds: {
        checks: ['rate==1'],
        http_req_failed: ['rate==0'],
        served_without_upstream: [`rate>${MIN_HIT_RATIO}`],
        upstream_tokens_unexpected: ['count==0'],
        'http_req_duration{scenario:fleet}': [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
        dropped_iterations: [`rate<${RATE / 100}`],
    },
    summaryTrendStats: TREND_STATS,
};

export function setup() {
    return { before: idpStats() };
}

export default function () {
    const client = loadClient(pick());
    const res = postToken(client, { auth: Math.random() < 0.5 ? 'basic' : 'body' });
    checkToken(res);
    const cache = xCache(res);
    avoided.add(cache === 'HIT' || cache === 'COALESCED' || cache === 'STALE');
}

export function teardown(data) {
    const after = idpStats();
    let clients = 0;
    let extra = 0;
    for (let i = 0; i < CLIENTS; i++) {
        const n = issuedDelta(data.before, after, loadClient(i).id);
        if (n > 0) clients += 1;
        if (n > 1) extra += n - 1;
    }
    const total = after.issued_total - data.before.issued_total;
    tokensIssued.add(total);
    clientsIssued.add(clients);
    overIssued.add(extra);
    check(null, { 'at most one token per client during the run': () => extra === 0 });
    console.log(`mock-idp issued ${total} token(s) to ${clients} distinct client(s) of ${CLIENTS}`);
}
