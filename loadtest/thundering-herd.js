// thundering-herd: many VUs on the same cold keys at the same moment, across all replicas.
//
// ROUNDS times, every VU waits for the same instant and then sends, all at once (http.batch),
// one request for each of KEYS cold keys: VUS x KEYS concurrent requests, VUS per key,
// spread by HAProxy over every replica. Key k of round r is client load-client-(OFFSET+k)
// with aws_client_metadata naming this run and round, so every round's keys are cold.
// Teardown reads mock-idp's /admin/stats: it must have issued exactly ROUNDS tokens to each
// of the KEYS clients (one per key) and none to anyone else, or the run fails.
//
//   loadtest/run test loadtest/thundering-herd.js [-e VUS=100 -e KEYS=20 -e ROUNDS=5]
//   docker compose run --rm k6 run /scripts/thundering-herd.js
//
// VUS [100], KEYS [20], ROUNDS [5], ROUND_GAP_MS [3000], OFFSET [0] (clients OFFSET..OFFSET+KEYS-1)

import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import {
    TREND_STATS, envInt, herdRounds, idpStats, issuedDelta, json, loadClient, newRunId, shuffle, tokenRequest, waitForRound,
    xCache,
} from './lib/common.js';

const VUS = envInt('VUS', 100);
const KEYS = envInt('KEYS', 20);
const ROUNDS = envInt('ROUNDS', 5);
const GAP_MS = envInt('ROUND_GAP_MS', 3000);
const OFFSET = envInt('OFFSET', 0);
if (KEYS < 1 || OFFSET + KEYS > 1000) throw new Error('KEYS and OFFSET must stay within load-client-0..999');

const keyViolations = new Counter('herd_key_violations');
const tokensIssued = new Counter('upstream_tokens_issued');
const misses = new Counter('x_cache_miss');
const coalesced = new Counter('x_cache_coalesced');
const hits = new Counter('x_cache_hit');
const roundLatency = new Trend('herd_round_duration', true);

export const options = {
    scenarios: {
        herd: herdRounds(VUS, ROUNDS, GAP_MS),
    },
    // Every request of a VU's round in parallel.
    batch: KEYS,
    batchPerHost: KEYS,
    thresholds: {
        checks: ['rate==1'],
        http_req_failed: ['rate==0'],
        herd_key_violations: ['count==0'],
        'http_req_duration{name:POST /oauth2/token}': ['p(99)<2000'],
    },
    summaryTrendStats: TREND_STATS,
};

export function setup() {
    const before = idpStats();
    // All VUs start their first round together, a little after setup.
    return { run: newRunId(), before, start: Date.now() + 2000 };
}

export default function (data) {
    const round = waitForRound(data.start, GAP_MS);

    const meta = JSON.stringify({ herd: data.run, round });
    const keys = shuffle([...Array(KEYS).keys()]);
    const requests = keys.map((k) => tokenRequest(loadClient(OFFSET + k), {
        auth: (k + exec.vu.idInTest) % 2 === 0 ? 'basic' : 'body',
        extra: { aws_client_metadata: meta },
    }));
    const started = Date.now();
    const responses = http.batch(requests);
    roundLatency.add(Date.now() - started);
    for (const res of responses) {
        const body = json(res);
        check(res, {
            'status 200': (r) => r.status === 200,
            'access_token': () => body !== null && typeof body.access_token === 'string',
        });
        const cache = xCache(res);
        if (cache === 'MISS') misses.add(1);
        else if (cache === 'COALESCED') coalesced.add(1);
        else if (cache === 'HIT') hits.add(1);
    }
}

export function teardown(data) {
    // Give a straggling leader a moment to be counted (nothing should be in flight by now).
    sleep(1);
    const after = idpStats();
    let violations = 0;
    const wrong = [];
    for (let k = 0; k < KEYS; k++) {
        const id = loadClient(OFFSET + k).id;
        const issued = issuedDelta(data.before, after, id);
        if (issued !== ROUNDS) {
            violations += Math.abs(issued - ROUNDS);
            wrong.push(`${id}: ${issued}`);
        }
    }
    const total = after.issued_total - data.before.issued_total;
    tokensIssued.add(total);
    if (total !== KEYS * ROUNDS) violations += Math.abs(total - KEYS * ROUNDS - 0);
    keyViolations.add(violations);
    check(null, {
        'mock-idp issued exactly one token per key per round': () => wrong.length === 0,
        'mock-idp issued no other token': () => total === KEYS * ROUNDS,
    });
    console.log(`${VUS} VUs x ${KEYS} keys x ${ROUNDS} rounds = ${VUS * KEYS * ROUNDS} requests; ` +
        `mock-idp issued ${total} token(s), expected exactly ${KEYS * ROUNDS}` +
        (wrong.length ? `; wrong counts: ${wrong.join(', ')}` : ''));
}
