// chaos: steady load through the load balancer while replicas die and Redis restarts; not one
// request may fail.
//
// `loadtest/run chaos` runs this script and, during it, SIGKILLs one token-proxy replica
// (t=10 s), stops Redis for 3 s and starts it again empty (t=16 s), restarts the killed
// replica (t=24 s), then SIGTERMs another one (t=28 s) as a rolling deploy does: it must drain
// (its /readyz turns 503 while it keeps serving for TOKEN_PROXY_DRAIN_DELAY, so HAProxy takes
// it out before its listeners close) and exit 0, and is started again. `loadtest/run drain`
// runs only that SIGTERM (t=10 s). The load mixes warm keys (HITs) with keys that turn cold every ROTATE
// seconds, so misses, cluster-wide single flight and the upstream are exercised throughout,
// including while Redis is down and while HAProxy still thinks the dead replica is up.
// mock-idp answers after UPSTREAM_LATENCY_MS (set through /admin/faults, reset afterwards), so
// upstream calls are in flight when the replica is killed: their callers' connections break
// (HAProxy sends those requests again to another replica) and the locks the dead replica held
// expire (waiters on other replicas take them over).
// Thresholds: zero failed requests, every answer a 200 with a token.
//
//   loadtest/run chaos
//   docker compose run --rm k6 run /scripts/chaos.js   (and meanwhile, by hand:
//       docker kill -s KILL token-proxy-token-proxy-2; docker compose restart redis;
//       docker compose start token-proxy; docker restart token-proxy-token-proxy-3)
//
// RATE [300] requests/s, DURATION [45s], KEYS [50], COLD_SHARE [0.2], ROTATE [5] seconds,
// UPSTREAM_LATENCY_MS [50]

import { check } from 'k6';
import { Counter } from 'k6/metrics';
import {
    arrivalRate, TREND_STATS, checkToken, envFloat, envInt, idpFaults, idpStats, loadClient, newRunId, postToken, xCache,
} from './lib/common.js';

const RATE = envInt('RATE', 300);
const DURATION = __ENV.DURATION || '45s';
const KEYS = envInt('KEYS', 50);
const COLD_SHARE = envFloat('COLD_SHARE', 0.2);
const ROTATE_MS = envInt('ROTATE', 5) * 1000;
const LATENCY_MS = envInt('UPSTREAM_LATENCY_MS', 50);

const tokensIssued = new Counter('upstream_tokens_issued');
const outcome = {
    HIT: new Counter('x_cache_hit'),
    MISS: new Counter('x_cache_miss'),
    COALESCED: new Counter('x_cache_coalesced'),
    STALE: new Counter('x_cache_stale'),
};

export const options = {
    scenarios: {
        steady: arrivalRate(RATE, DURATION, { maxVUs: 500 }),
    },
    thresholds: {
        // The point of the exercise: not one failed request through HAProxy.
        http_req_failed: ['rate==0'],
        checks: ['rate==1'],
        // A killed lock holder costs its waiters up to TOKEN_PROXY_LOCK_TTL (5 s).
        'http_req_duration{scenario:steady}': ['p(99)<6000'],
    },
    summaryTrendStats: TREND_STATS,
};

export function setup() {
    const original = idpFaults().latency_ms;
    idpFaults({ latency_ms: LATENCY_MS });
    return { run: newRunId(), before: idpStats(), start: Date.now(), original };
}

export default function (data) {
    const k = Math.floor(Math.random() * KEYS);
    let meta;
    if (Math.random() < COLD_SHARE) {
        // Keys that turn cold every ROTATE seconds.
        meta = JSON.stringify({ chaos: data.run, epoch: Math.floor((Date.now() - data.start) / ROTATE_MS) });
    } else {
        meta = JSON.stringify({ chaos: data.run });
    }
    const res = postToken(loadClient(k), { auth: Math.random() < 0.5 ? 'basic' : 'body', extra: { aws_client_metadata: meta } });
    checkToken(res);
    const counter = outcome[xCache(res)];
    if (counter) counter.add(1);
}

export function teardown(data) {
    idpFaults({ latency_ms: data.original });
    const after = idpStats();
    const total = after.issued_total - data.before.issued_total;
    tokensIssued.add(total);
    check(null, { 'mock-idp answered': () => total >= 0 });
    console.log(`mock-idp issued ${total} token(s) during the chaos run`);
}
