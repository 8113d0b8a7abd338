// overload: a replica offered five times what it can handle sheds the excess at once.
//
// Every request is a cold key (a fresh `aws_client_metadata`, for one of CLIENTS generated
// clients, so no client's failed-authentication limit on calls in flight gets in the way: see
// deploy/mock-idp.env, MOCK_IDP_GENERATED_CLIENTS), so each admitted request holds
// one of the replica's TOKEN_PROXY_MAX_CONCURRENT_REQUESTS slots for one upstream round trip
// (mock-idp's latency). Capacity is therefore LIMIT / LATENCY requests a second; the scenario
// offers OVERLOAD times that. What must hold: the excess is answered 503 (with Retry-After) in
// milliseconds, admitted requests still get their tokens, nothing else fails. bench/overload.sh
// runs it against one replica and also watches the replica's memory.
//
//   LIMIT [64]  LATENCY_MS [200]  OVERLOAD [5]  DURATION [20s]  CLIENTS [1000]
//   BASE_URL, IDP_ADMIN_URL: see lib/common.js.

import http from 'k6/http';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import {
    TREND_STATS, arrivalRate, checkToken, envInt, envFloat, idpFaults, loadClient, newRunId, postToken,
} from './lib/common.js';

const LIMIT = envInt('LIMIT', 64);
const LATENCY_MS = envInt('LATENCY_MS', 200);
const OVERLOAD = envFloat('OVERLOAD', 5);
const CLIENTS = envInt('CLIENTS', 1000);
const CAPACITY = Math.floor((LIMIT * 1000) / LATENCY_MS);
const RATE = Math.round(CAPACITY * OVERLOAD);

const shedDuration = new Trend('shed_duration', true);
const admittedDuration = new Trend('admitted_duration', true);
const unexpected = new Counter('unexpected_answers');
const shed = new Counter('shed_answers');

export const options = {
    scenarios: { overload: arrivalRate(RATE, __ENV.DURATION || '20s', { maxVUs: 2 * LIMIT + Math.ceil(RATE / 4) }) },
    thresholds: {
        unexpected_answers: ['count==0'],
        // Offered more than it can handle, the replica must have shed something.
        shed_answers: ['count>0'],
        // Shed answers must be fast: the point of shedding is not to queue.
        shed_duration: ['p(99)<50'],
        checks: ['rate==1'],
    },
    summaryTrendStats: TREND_STATS,
};

export function setup() {
    idpFaults({ latency_ms: LATENCY_MS });
    console.log(`capacity ${CAPACITY} req/s (limit ${LIMIT} / ${LATENCY_MS} ms); offering ${RATE} req/s`);
    return { run: newRunId() };
}

export default function (data) {
    const meta = JSON.stringify({ overload: `${data.run}-${__VU}-${__ITER}` });
    const res = postToken(loadClient(Math.floor(Math.random() * CLIENTS)), {
        extra: { aws_client_metadata: meta },
        expected: http.expectedStatuses(200, 503),
    });
    if (res.status === 503) {
        shed.add(1);
        shedDuration.add(res.timings.duration);
        check(res, { 'shed: Retry-After': (r) => r.headers['Retry-After'] === '1' });
    } else if (res.status === 200) {
        admittedDuration.add(res.timings.duration);
        checkToken(res, 'admitted');
    } else {
        unexpected.add(1, { status: String(res.status) });
    }
}

export function teardown() {
    idpFaults({ latency_ms: 0 });
}
