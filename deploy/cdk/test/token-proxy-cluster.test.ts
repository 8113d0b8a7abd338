import * as fs from 'fs';
import * as path from 'path';
import { App, Duration, Stack, Token, Validations, aws_ec2 as ec2, aws_ecs as ecs, aws_secretsmanager as secretsmanager } from 'aws-cdk-lib';
import { Match, Template } from 'aws-cdk-lib/assertions';
import { AwsSolutionsChecks } from 'cdk-nag';
import { REDIS_ACCESS_STRING, TokenProxyCluster, TokenProxyClusterProps, checkRedisUrl } from '../lib';

const UPSTREAM = 'https://example.auth.eu-west-1.amazoncognito.com/oauth2/token';
const POOL = 'arn:aws:cognito-idp:eu-west-1:111111111111:userpool/eu-west-1_EXAMPLE';

function synth(
  extra: Partial<TokenProxyClusterProps> = {},
  nag = false,
  before?: (proxy: TokenProxyCluster) => void,
): { stack: Stack; proxy: TokenProxyCluster; template: Template } {
  const app = new App();
  const stack = new Stack(app, 'Test');
  const proxy = new TokenProxyCluster(stack, 'TokenProxy', {
    image: ecs.ContainerImage.fromRegistry('example/token-proxy:test'),
    upstreamUrl: UPSTREAM,
    originVerify: { userPoolArn: POOL },
    ...extra,
  });
  before?.(proxy);
  if (nag) {
    Validations.of(app).addPlugins(new AwsSolutionsChecks(app));
    app.synth(); // throws "Validation failed" on a finding not acknowledged
  }
  return { stack, proxy, template: Template.fromStack(stack) };
}

function proxyContainer(template: Template): any {
  const tds = Object.values(template.findResources('AWS::ECS::TaskDefinition'));
  expect(tds).toHaveLength(1);
  const containers = (tds[0] as any).Properties.ContainerDefinitions as any[];
  const c = containers.find((x) => x.Name === 'token-proxy');
  expect(c).toBeDefined();
  return c;
}

function env(container: any): Record<string, unknown> {
  return Object.fromEntries((container.Environment as any[]).map((e) => [e.Name, e.Value]));
}

describe('TokenProxyCluster', () => {
  const { template, proxy, stack } = synth();

  test('the service: Fargate, ARM64 by default, two tasks, behind the load balancer', () => {
    template.resourceCountIs('AWS::ECS::Service', 1);
    template.hasResourceProperties('AWS::ECS::Service', {
      LaunchType: 'FARGATE',
      DesiredCount: 2,
      LoadBalancers: [Match.objectLike({ ContainerName: 'token-proxy', ContainerPort: 8080 })],
      NetworkConfiguration: { AwsvpcConfiguration: Match.objectLike({ AssignPublicIp: 'DISABLED' }) },
    });
    template.hasResourceProperties('AWS::ECS::TaskDefinition', {
      RuntimePlatform: { CpuArchitecture: 'ARM64', OperatingSystemFamily: 'LINUX' },
    });
    const x86 = synth({ cpuArchitecture: ecs.CpuArchitecture.X86_64 }).template;
    x86.hasResourceProperties('AWS::ECS::TaskDefinition', { RuntimePlatform: Match.objectLike({ CpuArchitecture: 'X86_64' }) });
  });

  test('the load balancer is internal; its health check is /readyz on the admin port', () => {
    template.resourceCountIs('AWS::ElasticLoadBalancingV2::LoadBalancer', 1);
    template.hasResourceProperties('AWS::ElasticLoadBalancingV2::LoadBalancer', { Scheme: 'internal', Type: 'application' });
    template.hasResourceProperties('AWS::ElasticLoadBalancingV2::TargetGroup', {
      Port: 8080,
      HealthCheckPath: '/readyz',
      HealthCheckPort: '9090',
      Matcher: { HttpCode: '200' },
    });
  });

  test('the deregistration delay, the drain delay and the stop timeout agree', () => {
    const custom = synth({ drainDelay: Duration.seconds(12) }).template;
    for (const [t, seconds] of [
      [template, 5],
      [custom, 12],
    ] as const) {
      t.hasResourceProperties('AWS::ElasticLoadBalancingV2::TargetGroup', {
        TargetGroupAttributes: Match.arrayWith([{ Key: 'deregistration_delay.timeout_seconds', Value: String(seconds) }]),
      });
      const c = proxyContainer(t);
      expect(env(c).TOKEN_PROXY_DRAIN_DELAY).toBe(`${seconds}s`);
      // SIGTERM -> drain delay -> in-flight requests (up to the upstream timeout, 10 s)
      expect(c.StopTimeout).toBeGreaterThan(seconds + 10);
    }
  });

  test('the replicas keep idle connections longer than the load balancer, which outwaits the upstream', () => {
    const lb = Object.values(template.findResources('AWS::ElasticLoadBalancingV2::LoadBalancer'))[0] as any;
    const attr = (lb.Properties.LoadBalancerAttributes as any[]).find((a) => a.Key === 'idle_timeout.timeout_seconds');
    const idle = Number(attr.Value);
    const e = env(proxyContainer(template));
    const seconds = (v: unknown) => Number(/^(\d+)s$/.exec(String(v))![1]);
    expect(seconds(e.TOKEN_PROXY_HEADER_READ_TIMEOUT)).toBeGreaterThan(idle);
    expect(idle).toBeGreaterThan(seconds(e.TOKEN_PROXY_UPSTREAM_TIMEOUT));
    expect(() => synth({ upstreamTimeout: Duration.seconds(29) })).toThrow(/upstreamTimeout/);
  });

  test('the admin listener is on the task address, the client listener on 8080', () => {
    const e = env(proxyContainer(template));
    expect(e.TOKEN_PROXY_ADMIN_LISTEN).toBe('0.0.0.0:9090');
    expect(e.TOKEN_PROXY_LISTEN).toBe('0.0.0.0:8080');
    expect(e.TOKEN_PROXY_UPSTREAM_URL).toBe(UPSTREAM);
  });

  test('the cache: ElastiCache Serverless Valkey, reached over TLS with no password in the URL', () => {
    template.resourceCountIs('AWS::ElastiCache::ServerlessCache', 1);
    template.hasResourceProperties('AWS::ElastiCache::ServerlessCache', { Engine: 'valkey' });
    const url = env(proxyContainer(template)).TOKEN_PROXY_REDIS_URL as any;
    const text = JSON.stringify(url);
    // ElastiCache Serverless is cluster mode only: the proxy must follow its slots.
    expect(url['Fn::Join'][1][0]).toBe('rediss-cluster://');
    expect(text).toContain('Endpoint.Address');
    expect(text).not.toContain('@');
  });

  test('an existing Redis: its URL must be TLS and carry no credentials', () => {
    const t = synth({ existingRedis: { url: 'rediss://redis.internal:6379', port: 6379 } }).template;
    t.resourceCountIs('AWS::ElastiCache::ServerlessCache', 0);
    expect(env(proxyContainer(t)).TOKEN_PROXY_REDIS_URL).toBe('rediss://redis.internal:6379');
    expect(() => checkRedisUrl('rediss://:hunter2@redis.internal:6379', false)).toThrow(/credentials/);
    expect(() => checkRedisUrl('rediss-cluster://redis.internal:6379', false)).not.toThrow();
    expect(() => checkRedisUrl('rediss-sentinel://s1:26379?sentinelServiceName=m', false)).not.toThrow();
    expect(() => checkRedisUrl('rediss://user:pw@redis.internal:6379', false)).toThrow(/credentials/);
    expect(() => checkRedisUrl('redis://redis.internal:6379', false)).toThrow(/TLS/);
    expect(() => checkRedisUrl('redis://redis.internal:6379', true)).not.toThrow();
    expect(() => checkRedisUrl('http://redis.internal:6379', true)).toThrow();
  });

  test('IAM authentication: an IAM user in the cache\'s user group, elasticache:Connect, the settings', () => {
    const t = synth({ redisIamAuth: true }).template;
    const users = Object.values(t.findResources('AWS::ElastiCache::User')) as any[];
    const proxyUser = users.find((u) => u.Properties.AuthenticationMode.Type === 'iam');
    expect(proxyUser).toBeDefined();
    expect(proxyUser.Properties.UserId).toBe(proxyUser.Properties.UserName);
    expect(proxyUser.Properties.AccessString).toBe(REDIS_ACCESS_STRING);
    const defaultUser = users.find((u) => u.Properties.UserName === 'default');
    expect(defaultUser.Properties.AccessString).toMatch(/^off /);
    t.resourceCountIs('AWS::ElastiCache::UserGroup', 1);
    const cache = Object.values(t.findResources('AWS::ElastiCache::ServerlessCache'))[0] as any;
    expect(cache.Properties.UserGroupId).toEqual({ Ref: Object.keys(t.findResources('AWS::ElastiCache::UserGroup'))[0] });
    const e = env(proxyContainer(t));
    expect(e.TOKEN_PROXY_REDIS_IAM).toBe('elasticache-serverless');
    expect(e.TOKEN_PROXY_REDIS_IAM_USER).toBe(proxyUser.Properties.UserId);
    expect(e.TOKEN_PROXY_REDIS_IAM_CACHE).toBe(cache.Properties.ServerlessCacheName);
    expect(e.TOKEN_PROXY_REDIS_IAM_REGION).toBeDefined();
    const connect = Object.values(t.findResources('AWS::IAM::Policy'))
      .flatMap((p: any) => p.Properties.PolicyDocument.Statement)
      .filter((st: any) => st.Action === 'elasticache:Connect');
    expect(connect).toHaveLength(1);
    const [cacheId, userId] = [
      Object.keys(t.findResources('AWS::ElastiCache::ServerlessCache'))[0],
      Object.keys(t.findResources('AWS::ElastiCache::User')).find((k) => (t.findResources('AWS::ElastiCache::User') as any)[k].Properties.AuthenticationMode.Type === 'iam'),
    ];
    expect(connect[0].Resource).toEqual([{ 'Fn::GetAtt': [cacheId, 'ARN'] }, { 'Fn::GetAtt': [userId, 'Arn'] }]);
    // Without the option: none of it.
    template.resourceCountIs('AWS::ElastiCache::User', 0);
    expect(env(proxyContainer(template)).TOKEN_PROXY_REDIS_IAM).toBeUndefined();
    expect(() => synth({ redisIamAuth: true, existingRedis: { url: 'rediss://redis.internal:6379', port: 6379 } })).toThrow(
      /redisIamAuth/,
    );
  });

  test('the IAM user\'s access string is the README\'s least-privilege ACL', () => {
    const readme = fs.readFileSync(path.join(__dirname, '..', '..', '..', '..', 'README.md'), 'utf8');
    const line = readme.split('\n').find((l) => l.startsWith('ACL SETUSER token-proxy on >PASSWORD '));
    expect(line).toBeDefined();
    expect(REDIS_ACCESS_STRING).toBe(line!.replace('ACL SETUSER token-proxy ', '').replace(' >PASSWORD', ''));
  });

  test('secrets reach the task only as ECS secrets from Secrets Manager', () => {
    const c = proxyContainer(template);
    const secretNames = (c.Secrets as any[]).map((s) => s.Name).sort();
    expect(secretNames).toEqual(['TOKEN_PROXY_ADMIN_TOKEN', 'TOKEN_PROXY_SECRET', 'TOKEN_PROXY_UPSTREAM_HEADERS']);
    const secretIds = Object.keys(template.findResources('AWS::SecretsManager::Secret'));
    for (const s of c.Secrets as any[]) {
      expect(secretIds).toContain(s.ValueFrom.Ref);
    }
    // No secret-like name among the plain environment values, of any container.
    for (const td of Object.values(template.findResources('AWS::ECS::TaskDefinition'))) {
      for (const container of (td as any).Properties.ContainerDefinitions) {
        for (const name of Object.keys(env(container))) {
          expect(name).not.toMatch(/SECRET|ADMIN_TOKEN|PASSWORD|HEADERS/);
        }
      }
    }
    // Secrets are generated by Secrets Manager, never written in the template.
    for (const id of ['RootSecret', 'AdminToken', 'OriginVerifySecret']) {
      const [res] = Object.entries(template.findResources('AWS::SecretsManager::Secret')).filter(([k]) => k.includes(id));
      expect(res).toBeDefined();
      expect((res[1] as any).Properties.GenerateSecretString).toBeDefined();
      expect((res[1] as any).Properties.SecretString).toBeUndefined();
    }
    // The root secret: 44 characters of [A-Za-z0-9] are valid base64 of 33 bytes.
    template.hasResourceProperties('AWS::SecretsManager::Secret', {
      GenerateSecretString: { PasswordLength: 44, ExcludePunctuation: true, IncludeSpace: false },
    });
    expect(() => synth({ environment: { TOKEN_PROXY_ADMIN_TOKEN: 'x'.repeat(20) } })).toThrow(/looks secret/);
    expect(() => synth({ environment: { TOKEN_PROXY_PREVIOUS_SECRETS: 'x'.repeat(44) } })).toThrow(/looks secret/);
  });

  test('previous root secrets during a rotation come from Secrets Manager too', () => {
    const app = new App();
    const stack = new Stack(app, 'Rotation');
    const previous = new secretsmanager.Secret(stack, 'Previous');
    new TokenProxyCluster(stack, 'TokenProxy', {
      image: ecs.ContainerImage.fromRegistry('example/token-proxy:test'),
      upstreamUrl: UPSTREAM,
      previousSecrets: previous,
    });
    const c = proxyContainer(Template.fromStack(stack));
    expect(c.Secrets).toContainEqual({ Name: 'TOKEN_PROXY_PREVIOUS_SECRETS', ValueFrom: { Ref: stack.getLogicalId(previous.node.defaultChild as any) } });
    expect(Object.keys(env(c))).not.toContain('TOKEN_PROXY_PREVIOUS_SECRETS');
  });

  test('the upstream headers secret is derived from the origin-verify secret, not a literal', () => {
    const headers = Object.entries(template.findResources('AWS::SecretsManager::Secret')).find(([k]) => k.includes('UpstreamHeaders'));
    const text = JSON.stringify((headers![1] as any).Properties.SecretString);
    expect(text).toMatch(/^\{"Fn::Join":\["",\["X-Origin-Verify: \{\{resolve:secretsmanager:",\{"Ref":"TokenProxyOriginVerifySecret[0-9A-F]+"\},":SecretString:value\}\}"\]\]\}$/);
  });

  test('the web ACL blocks /oauth2/token without the origin-verify header and is on the user pool', () => {
    template.resourceCountIs('AWS::WAFv2::WebACL', 1);
    template.hasResourceProperties('AWS::WAFv2::WebACL', {
      Scope: 'REGIONAL',
      DefaultAction: { Allow: {} },
      Rules: [
        Match.objectLike({
          Action: { Block: {} },
          Statement: {
            AndStatement: {
              Statements: [
                { ByteMatchStatement: Match.objectLike({ FieldToMatch: { UriPath: {} }, PositionalConstraint: 'EXACTLY', SearchString: '/oauth2/token' }) },
                {
                  NotStatement: {
                    Statement: {
                      ByteMatchStatement: Match.objectLike({
                        FieldToMatch: { SingleHeader: { Name: 'x-origin-verify' } },
                        PositionalConstraint: 'EXACTLY',
                        SearchString: { 'Fn::Join': ['', ['{{resolve:secretsmanager:', Match.anyValue(), ':SecretString:value}}']] },
                      }),
                    },
                  },
                },
              ],
            },
          },
        }),
      ],
    });
    template.hasResourceProperties('AWS::WAFv2::WebACLAssociation', { ResourceArn: POOL });
  });

  test('origin-verify rotation: accept both, then send the new value, with new tasks', () => {
    const accept = synth({ originVerify: { userPoolArn: POOL, rotation: 'accept-next' } }).template;
    const send = synth({ originVerify: { userPoolArn: POOL, rotation: 'send-next' } }).template;
    for (const t of [accept, send]) {
      const acl = JSON.stringify(t.findResources('AWS::WAFv2::WebACL'));
      expect(acl).toContain('OrStatement');
      expect(acl).toContain(':SecretString:value}}');
      expect(acl).toContain(':SecretString:next}}');
    }
    const headers = (t: Template) => JSON.stringify(Object.entries(t.findResources('AWS::SecretsManager::Secret')).find(([k]) => k.includes('UpstreamHeaders'))![1]);
    expect(headers(accept)).toContain(':SecretString:value}}');
    expect(headers(send)).toContain(':SecretString:next}}');
    expect(env(proxyContainer(accept)).ORIGIN_VERIFY_ROTATION_STEP).toBe('accept-next');
    expect(env(proxyContainer(send)).ORIGIN_VERIFY_ROTATION_STEP).toBe('send-next');
    expect(JSON.stringify(template.findResources('AWS::WAFv2::WebACL'))).not.toContain(':SecretString:next}}');
  });

  test('without origin verify there is no web ACL and no headers secret', () => {
    const t = synth({ originVerify: undefined }).template;
    t.resourceCountIs('AWS::WAFv2::WebACL', 0);
    expect((proxyContainer(t).Secrets as any[]).map((s) => s.Name)).not.toContain('TOKEN_PROXY_UPSTREAM_HEADERS');
  });

  test('security groups are least privilege', () => {
    const sgs = template.findResources('AWS::EC2::SecurityGroup');
    const ingress = Object.values(template.findResources('AWS::EC2::SecurityGroupIngress')).map((r: any) => r.Properties);
    const egress = Object.values(template.findResources('AWS::EC2::SecurityGroupEgress')).map((r: any) => r.Properties);
    const inline = Object.values(sgs).flatMap((r: any) => [...(r.Properties.SecurityGroupIngress ?? []), ...(r.Properties.SecurityGroupEgress ?? [])]);
    const all = [...ingress, ...egress, ...inline];
    // Nothing is open to the world, except the tasks' HTTPS egress (token endpoint, AWS APIs).
    for (const rule of all) {
      if (rule.CidrIp === '0.0.0.0/0' || rule.CidrIpv6 === '::/0') {
        expect(rule).toMatchObject({ IpProtocol: 'tcp', FromPort: 443, ToPort: 443 });
        expect(rule.Description).toMatch(/HTTPS/);
      }
      expect(rule.IpProtocol).not.toBe('-1');
    }
    // No group allows all outbound traffic: each has its own egress list (without one,
    // EC2 adds "all traffic to 0.0.0.0/0").
    for (const sg of Object.values(sgs) as any[]) {
      expect(sg.Properties.SecurityGroupEgress?.length).toBeGreaterThan(0);
    }
    const id = (sg: ec2.SecurityGroup) => stack.resolve(sg.securityGroupId);
    const lb = id(proxy.loadBalancerSecurityGroup);
    const svc = id(proxy.serviceSecurityGroup);
    const cache = id(proxy.cacheSecurityGroup!);
    // The tasks accept 8080 and 9090 from the load balancer only.
    const svcIngress = ingress.filter((r) => JSON.stringify(r.GroupId) === JSON.stringify(svc));
    expect(svcIngress.map((r) => r.FromPort).sort()).toEqual([8080, 9090]);
    for (const r of svcIngress) {
      expect(r.SourceSecurityGroupId).toEqual(lb);
      expect(r.ToPort).toBe(r.FromPort);
    }
    // The cache accepts the tasks only, on its two ports.
    const cacheIngress = ingress.filter((r) => JSON.stringify(r.GroupId) === JSON.stringify(cache));
    expect(cacheIngress).toHaveLength(1);
    expect(cacheIngress[0]).toMatchObject({ FromPort: 6379, ToPort: 6380, SourceSecurityGroupId: svc });
    // The load balancer accepts the VPC's CIDR block on its listener port only.
    const lbSg = (sgs as any)[lb['Fn::GetAtt'][0]].Properties;
    expect(lbSg.SecurityGroupIngress).toEqual([expect.objectContaining({ CidrIp: '10.0.0.0/16', FromPort: 80, ToPort: 80 })]);
  });

  test('log groups have a retention; the proxy logs to its own group', () => {
    const groups = Object.values(template.findResources('AWS::Logs::LogGroup')) as any[];
    expect(groups.length).toBeGreaterThanOrEqual(1);
    for (const g of groups) {
      expect(g.Properties.RetentionInDays).toBe(30);
    }
    const c = proxyContainer(template);
    expect(c.LogConfiguration.LogDriver).toBe('awslogs');
  });

  test('every TOKEN_PROXY_* variable the task gets is a token-proxy setting (README, Configuration)', () => {
    const readme = fs.readFileSync(path.join(__dirname, '..', '..', '..', '..', 'README.md'), 'utf8');
    const documented = new Set([...readme.matchAll(/^\| `(TOKEN_PROXY_[A-Z0-9_]+)` \|/gm)].map((m) => m[1]));
    expect(documented.size).toBeGreaterThan(20);
    const c = proxyContainer(template);
    const names = [...Object.keys(env(c)), ...(c.Secrets as any[]).map((s) => s.Name)].filter((n) => n.startsWith('TOKEN_PROXY_'));
    expect(names.length).toBeGreaterThan(8);
    for (const name of names) {
      expect(documented.has(name) ? name : `${name} (not in the README)`).toBe(name);
    }
  });

  test('several upstreams travel as the text of a configuration file, one table each', () => {
    const { template } = synth({
      upstreamUrl: undefined,
      originVerify: undefined,
      upstreams: {
        orders: { url: UPSTREAM },
        'partners_2': { url: 'https://login.example.com/oauth2/v2.0/token', clientCallBudget: 500, clientCallBudgetWindow: Duration.hours(1), rateLimit: 20 },
      },
      defaultUpstream: 'orders',
    });
    const vars = env(proxyContainer(template));
    expect(vars.TOKEN_PROXY_UPSTREAM_URL).toBeUndefined();
    expect(vars.TOKEN_PROXY_CONFIG_TOML).toBe(
      [
        '# TokenProxyCluster: named upstreams (README, "Several user pools or IdPs")',
        'default_upstream = "orders"',
        '',
        '[upstreams.orders]',
        `url = "${UPSTREAM}"`,
        '',
        '[upstreams.partners_2]',
        'url = "https://login.example.com/oauth2/v2.0/token"',
        'client_call_budget = 500',
        'rate_limit = 20',
        'client_call_budget_window = "3600s"',
        '',
      ].join('\n'),
    );
  });

  test('with origin verify, only the protected pool is sent the header', () => {
    const { template } = synth({
      upstreamUrl: undefined,
      upstreams: { orders: { url: UPSTREAM, originVerify: true }, partners: { url: 'https://login.example.com/oauth2/v2.0/token' } },
    });
    const vars = env(proxyContainer(template));
    const text = vars.TOKEN_PROXY_CONFIG_TOML as string;
    // The global TOKEN_PROXY_UPSTREAM_HEADERS (the secret) is unset for every other upstream.
    expect(text).toContain('[upstreams.partners]\nurl = "https://login.example.com/oauth2/v2.0/token"\nheaders = ""\n');
    expect(text).toContain(`[upstreams.orders]\nurl = "${UPSTREAM}"\n`);
    expect(text.match(/headers = ""/g)).toHaveLength(1);
    const secrets = (proxyContainer(template).Secrets as any[]).map((x) => x.Name);
    expect(secrets).toContain('TOKEN_PROXY_UPSTREAM_HEADERS');
  });

  test('upstreams are refused at synthesis when inconsistent', () => {
    const one = { url: UPSTREAM };
    // Upstreams without origin verify, unless a case sets it.
    const named = (upstreams: Record<string, any>, extra: Partial<TokenProxyClusterProps> = {}): Partial<TokenProxyClusterProps> => ({
      upstreamUrl: undefined,
      originVerify: undefined,
      upstreams,
      ...extra,
    });
    const cases: [Partial<TokenProxyClusterProps>, RegExp][] = [
      [{ upstreams: { orders: one } }, /either upstreamUrl .* or upstreams/],
      [{ upstreamUrl: undefined }, /either upstreamUrl .* or upstreams/],
      [named({}), /names no upstream/],
      [named({ 'a b': one }), /upstream name "a b"/],
      [named({ orders: one }, { defaultUpstream: 'partners' }), /defaultUpstream "partners" is not one of upstreams \(orders\)/],
      [{ defaultUpstream: 'orders' }, /defaultUpstream needs upstreams/],
      [named({ orders: { ...one, clientCallBudget: -1 } }), /clientCallBudget must be a whole number/],
      [named({ orders: one }, { originVerify: { userPoolArn: POOL } }), /exactly one of upstreams must be the protected user pool .* found 0/],
      [named({ a: { ...one, originVerify: true }, b: { ...one, originVerify: true } }, { originVerify: { userPoolArn: POOL } }), /found 2/],
      [named({ orders: { ...one, originVerify: true } }), /the construct has no originVerify/],
      [named({ orders: { url: Token.asString({ Ref: 'Url' }) } }), /upstreams.orders.url must be known at synthesis/],
      [named({ orders: { ...one, rateLimit: Token.asNumber({ Ref: 'N' }) } }), /upstreams.orders.rateLimit must be known/],
      [{ environment: { TOKEN_PROXY_CONFIG_TOML: 'x = 1' } }, /TOKEN_PROXY_CONFIG_TOML comes from the upstreamUrl or upstreams prop/],
      [{ environment: { TOKEN_PROXY_UPSTREAM_URL: UPSTREAM } }, /TOKEN_PROXY_UPSTREAM_URL comes from/],
    ];
    for (const [props, message] of cases) {
      expect(() => synth(props)).toThrow(message);
    }
  });

  test('the container runs as non-root with a read-only root filesystem', () => {
    const c = proxyContainer(template);
    expect(c.User).toBe('10001:10001');
    expect(c.ReadonlyRootFilesystem).toBe(true);
  });

  test('alarms for the README alert conditions, on the metrics the agent publishes', () => {
    const alarms = Object.values(template.findResources('AWS::CloudWatch::Alarm')).map((a: any) => JSON.stringify(a.Properties));
    const about = (s: string) => alarms.filter((a) => a.includes(s));
    expect(about('token_proxy_upstream_requests_total').length).toBe(1);
    expect(about('"outcome","Value":"stale"').length).toBeGreaterThanOrEqual(1);
    expect(about('token_proxy_redis_breaker_open').length).toBe(1);
    expect(about('token_proxy_lock_takeovers_total').length).toBe(1);
    expect(about('"Value":"hit"').length).toBe(1); // the hit ratio
    expect(about('UnHealthyHostCount').length).toBe(1);
    expect(about('HTTPCode_Target_5XX_Count').length).toBe(1);
    // the agent sidecar scrapes the admin port and declares the metrics the alarms use
    const td = JSON.stringify(template.findResources('AWS::ECS::TaskDefinition'));
    expect(td).toContain('cloudwatch-agent');
    expect(td).toContain('localhost:9090');
    for (const m of ['token_proxy_requests_total', 'token_proxy_upstream_requests_total', 'token_proxy_redis_breaker_open', 'token_proxy_lock_takeovers_total']) {
      expect(td).toContain(`^${m}$`);
    }
  });

  test('target-tracking autoscaling on CPU and requests per target', () => {
    template.hasResourceProperties('AWS::ApplicationAutoScaling::ScalableTarget', { MinCapacity: 2, MaxCapacity: 10 });
    template.resourceCountIs('AWS::ApplicationAutoScaling::ScalingPolicy', 2);
    template.hasResourceProperties('AWS::ApplicationAutoScaling::ScalingPolicy', {
      PolicyType: 'TargetTrackingScaling',
      TargetTrackingScalingPolicyConfiguration: Match.objectLike({
        PredefinedMetricSpecification: { PredefinedMetricType: 'ECSServiceAverageCPUUtilization' },
        TargetValue: 50,
      }),
    });
    template.hasResourceProperties('AWS::ApplicationAutoScaling::ScalingPolicy', {
      TargetTrackingScalingPolicyConfiguration: Match.objectLike({
        PredefinedMetricSpecification: Match.objectLike({ PredefinedMetricType: 'ALBRequestCountPerTarget' }),
      }),
    });
  });

  test('an existing VPC gets no new VPC, and passes cdk-nag too', () => {
    const app = new App();
    const stack = new Stack(app, 'Existing');
    const vpc = new ec2.Vpc(stack, 'Theirs', { maxAzs: 2 });
    Validations.of(vpc).acknowledge({ id: 'AwsSolutions-VPC7', reason: 'the test stands for a VPC the operator owns, flow logs and all' });
    new TokenProxyCluster(stack, 'TokenProxy', {
      image: ecs.ContainerImage.fromRegistry('example/token-proxy:test'),
      upstreamUrl: UPSTREAM,
      vpc,
    });
    Validations.of(app).addPlugins(new AwsSolutionsChecks(app));
    app.synth(); // throws on a finding not acknowledged
    const t = Template.fromStack(stack);
    t.resourceCountIs('AWS::EC2::VPC', 1);
    t.hasResourceProperties('AWS::ECS::Service', Match.anyValue());
  });
});

describe('cdk-nag AwsSolutions', () => {
  test('the construct passes, every accepted finding acknowledged with a reason', () => {
    const { stack } = synth({}, true);
    const acks: [string, string][] = [];
    for (const c of stack.node.findAll()) {
      for (const m of c.node.metadata) {
        if (m.type === Validations.ACKNOWLEDGED_RULES_METADATA_KEY) {
          acks.push(...(Object.entries(m.data as Record<string, string>) as [string, string][]));
        }
      }
    }
    const nagAcks = acks.filter(([id]) => id.includes('AwsSolutions-'));
    expect(nagAcks.map(([id]) => id.replace(/^.*(AwsSolutions-[A-Z0-9]+).*$/, '$1')).sort()).toEqual(
      expect.arrayContaining(['AwsSolutions-ECS2', 'AwsSolutions-ELB2', 'AwsSolutions-IAM5', 'AwsSolutions-SMG4', 'AwsSolutions-VPC7']),
    );
    for (const [, reason] of nagAcks) {
      expect(reason.length).toBeGreaterThan(40);
    }
  });

  test('a finding that is not acknowledged fails synthesis (the check is live)', () => {
    expect(() =>
      synth({}, true, (proxy) => proxy.loadBalancerSecurityGroup.addIngressRule(ec2.Peer.anyIpv4(), ec2.Port.tcp(80), 'the world')),
    ).toThrow(/AwsSolutions-EC23/);
  });
});
