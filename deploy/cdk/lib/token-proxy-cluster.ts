import {
  Duration,
  Token,
  RemovalPolicy,
  SecretValue,
  Stack,
  Validations,
  aws_cloudwatch as cloudwatch,
  aws_ec2 as ec2,
  aws_ecs as ecs,
  aws_elasticache as elasticache,
  aws_elasticloadbalancingv2 as elbv2,
  aws_iam as iam,
  aws_logs as logs,
  aws_secretsmanager as secretsmanager,
  aws_wafv2 as wafv2,
  aws_certificatemanager as acm,
  aws_s3 as s3,
} from 'aws-cdk-lib';
import { Construct } from 'constructs';

/** The client-facing port of the container (TOKEN_PROXY_LISTEN). */
export const PROXY_PORT = 8080;
/** The admin port (TOKEN_PROXY_ADMIN_LISTEN): /readyz, /healthz, /metrics, /admin/purge. */
export const ADMIN_PORT = 9090;
/**
 * The CloudWatch agent the sidecar runs: the version AWS's own ECS Prometheus quick-start
 * template pins. Newer versions work the same way; pin the one you have tested.
 */
export const DEFAULT_CLOUDWATCH_AGENT_IMAGE = 'public.ecr.aws/cloudwatch-agent/cloudwatch-agent:1.300042.1b746';
/** The load balancer's idle timeout; the replicas keep idle connections 5 s longer. */
const LOAD_BALANCER_IDLE_TIMEOUT_SECONDS = 30;
/** ElastiCache Serverless: the primary endpoint port and the reader endpoint port. */
/**
 * The proxy's least-privilege Redis access string: the README's "Redis ACL" line without its
 * password (a test keeps the two in step).
 */
export const REDIS_ACCESS_STRING =
  'on resetkeys ~tp:* resetchannels &tp:* -@all +evalsha +script|load +get +set +del +type +strlen +pttl +pexpire +time +publish +hget +hset +hdel +hexists +hgetall +hincrby +zadd +zremrangebyscore +zcard +zrange +zrem +subscribe +getrange +echo +ping +info +client|id +cluster|info +cluster|slots';
const SERVERLESS_CACHE_PORT = 6379;
const SERVERLESS_CACHE_READER_PORT = 6380;

/** An existing Redis (or Valkey) instead of the ElastiCache Serverless cache the construct makes. */
export interface ExistingRedisProps {
  /**
   * `rediss://HOST:PORT` (or `rediss-cluster://`, `rediss-sentinel://`, and their plain forms). It is handed to the tasks
   * as a plain environment value, so it must not carry a password: the construct refuses a URL
   * with credentials in it. A plain `redis://` URL is refused unless `allowPlaintext` is set.
   */
  readonly url: string;
  /** The port the tasks may reach it on (egress rule of the tasks' security group). */
  readonly port: number;
  /**
   * The Redis's security group: the construct adds one ingress rule from the tasks' security
   * group on `port`. Without it, allow the tasks in yourself.
   */
  readonly securityGroup?: ec2.ISecurityGroup;
  /** Accept `redis://` (no TLS). Default: false. */
  readonly allowPlaintext?: boolean;
}

/** The WAF origin-verify pattern: only requests carrying a secret header reach the token endpoint. */
export interface OriginVerifyProps {
  /** The Cognito user pool the web ACL is associated with: `arn:aws:cognito-idp:REGION:ACCOUNT:userpool/ID`. */
  readonly userPoolArn: string;
  /** The header the proxy adds and the web ACL requires. Default: `X-Origin-Verify`. */
  readonly headerName?: string;
  /**
   * The rotation step (README, "Deploy on AWS with CDK", rotating the origin-verify header):
   * - `steady` (default): the web ACL accepts the secret's `value`; the tasks send `value`.
   * - `accept-next`: the web ACL accepts `value` or `next`; the tasks still send `value`.
   * - `send-next`: the web ACL accepts `value` or `next`; the tasks send `next` (new tasks are
   *   started, since the task definition changes).
   */
  readonly rotation?: 'steady' | 'accept-next' | 'send-next';
}

/**
 * One named token endpoint (README, "Several user pools or IdPs"): an `[upstreams.NAME]` table,
 * served at `/NAME/oauth2/token`.
 */
export interface UpstreamProps {
  /** The token endpoint, e.g. `https://DOMAIN.auth.REGION.amazoncognito.com/oauth2/token`. */
  readonly url: string;
  /** Upstream calls per client_id per window at this upstream, counted cluster-wide. Default: no budget. */
  readonly clientCallBudget?: number;
  /** The budget's sliding window. Default: the proxy's (1 h). */
  readonly clientCallBudgetWindow?: Duration;
  /** Upstream calls per second at this upstream, cluster-wide. Default: the proxy's (no cap). */
  readonly rateLimit?: number;
  /**
   * With the construct's `originVerify`: this upstream is the user pool the web ACL protects, and
   * the only one sent the origin-verify header (every other upstream gets no extra header, so
   * the secret never reaches another IdP). Exactly one upstream must say so. Default: false.
   */
  readonly originVerify?: boolean;
}

export interface TokenProxyClusterProps {
  /** The container image of token-proxy (the repository's Dockerfile). */
  readonly image: ecs.ContainerImage;
  /**
   * The one token endpoint, served at `/oauth2/token`, e.g.
   * `https://DOMAIN.auth.REGION.amazoncognito.com/oauth2/token`. Give this or `upstreams`.
   */
  readonly upstreamUrl?: string;
  /**
   * Several token endpoints by name (letters, digits, `-`, `_`): each served at
   * `/NAME/oauth2/token`, handed to the tasks as TOKEN_PROXY_CONFIG_TOML. Give this or `upstreamUrl`.
   */
  readonly upstreams?: Record<string, UpstreamProps>;
  /** With `upstreams`: the one `/oauth2/token` reaches. Default: none (`/oauth2/token` answers 404). */
  readonly defaultUpstream?: string;
  /** An existing VPC. Default: a new VPC with two AZs, private subnets and one NAT gateway. */
  readonly vpc?: ec2.IVpc;
  /** The CIDR block of the new VPC (when `vpc` is not given). Default: 10.0.0.0/16. */
  readonly vpcCidr?: string;
  /** Subnets of the tasks, the load balancer and the cache. Default: the VPC's private subnets. */
  readonly subnets?: ec2.SubnetSelection;
  /** ARM64 (Graviton, the default: cheaper per vCPU) or X86_64. The image must be built for it. */
  readonly cpuArchitecture?: ecs.CpuArchitecture;
  /** Fargate task size. Default: 256 CPU units (0.25 vCPU) and 512 MiB. */
  readonly cpu?: number;
  readonly memoryLimitMiB?: number;
  /** Tasks at deploy time and the autoscaling bounds. Defaults: 2, 2, 10. */
  readonly desiredCount?: number;
  readonly minCapacity?: number;
  readonly maxCapacity?: number;
  /** Target-tracking targets: average CPU (%) and ALB requests per target per minute. Defaults: 50, 6000. */
  readonly targetCpuUtilizationPercent?: number;
  readonly targetRequestsPerTarget?: number;
  /**
   * TOKEN_PROXY_DRAIN_DELAY. The target group's deregistration delay is set to the same value,
   * and the container's stop timeout to it plus `upstreamTimeout` plus 5 s. Default: 5 s.
   */
  readonly drainDelay?: Duration;
  /** TOKEN_PROXY_UPSTREAM_TIMEOUT. Default: 10 s. */
  readonly upstreamTimeout?: Duration;
  /** Use this Redis instead of creating an ElastiCache Serverless (Valkey) cache. */
  readonly existingRedis?: ExistingRedisProps;
  /** Limits of the serverless cache: GB of data and ElastiCache Processing Units per second. Default: none. */
  readonly cacheMaxDataStorageGb?: number;
  readonly cacheMaxEcpuPerSecond?: number;
  /**
   * IAM authentication to the serverless cache this construct creates
   * (`TOKEN_PROXY_REDIS_IAM=elasticache-serverless`): an ElastiCache user with IAM
   * authentication and the proxy's least-privilege access string, a user group holding it (and
   * a disabled `default` user, which a user group needs), and `elasticache:Connect` on the cache
   * and the user for the task role. Without it the cache is reached over TLS and guarded by
   * security groups only (Serverless's default user, no password). Not with `existingRedis`.
   * Default: false.
   */
  readonly redisIamAuth?: boolean;
  /**
   * Earlier root secrets during a rotation (README, Deploy on AWS with CDK): a Secrets Manager
   * secret holding them (base64, comma-separated), handed over as TOKEN_PROXY_PREVIOUS_SECRETS.
   */
  readonly previousSecrets?: secretsmanager.ISecret;
  /** The WAF origin-verify pattern on a Cognito user pool (with `upstreams`: the one marked `originVerify`). Default: off. */
  readonly originVerify?: OriginVerifyProps;
  /** Who may call the load balancer. Default: the VPC's CIDR block. */
  readonly clientPeer?: ec2.IPeer;
  /** An ACM certificate: the listener speaks HTTPS on 443. Default: HTTP on port 80 (internal only). */
  readonly certificate?: acm.ICertificate;
  /** A bucket for the load balancer's access logs. Default: none. */
  readonly accessLogBucket?: s3.IBucket;
  /** Retention of the log groups. Default: one month. */
  readonly logRetention?: logs.RetentionDays;
  /**
   * Run the CloudWatch agent as a sidecar that scrapes `/metrics` and writes the alert metrics
   * as CloudWatch embedded metric format into the namespace `metricsNamespace`; the
   * token_proxy_* alarms need it. Default: true.
   */
  readonly cloudWatchAgent?: boolean;
  /** The CloudWatch agent image. Default: DEFAULT_CLOUDWATCH_AGENT_IMAGE (a pinned version). */
  readonly cloudWatchAgentImage?: string;
  /** Namespace of the scraped metrics. Default: `TokenProxy`. */
  readonly metricsNamespace?: string;
  /** Alarm when the share of requests served without an upstream call falls below this (%). Default: 50. */
  readonly minHitRatioPercent?: number;
  /** More TOKEN_PROXY_* settings (non-secret only: secrets go through Secrets Manager). */
  readonly environment?: Record<string, string>;
}

/** Names the alarms by what they watch. */
export interface TokenProxyAlarms {
  readonly upstreamErrors: cloudwatch.IAlarm;
  readonly staleServes: cloudwatch.IAlarm;
  readonly breakerOpen: cloudwatch.IAlarm;
  readonly lockTakeovers: cloudwatch.IAlarm;
  readonly hitRatio: cloudwatch.IAlarm;
  readonly unhealthyTargets: cloudwatch.IAlarm;
  readonly target5xx: cloudwatch.IAlarm;
}

/**
 * token-proxy on ECS Fargate behind an internal Application Load Balancer, with a shared
 * ElastiCache Serverless (Valkey) cache over TLS, its secrets in Secrets Manager, optional WAF
 * origin verification on the Cognito user pool, a log group, alarms and autoscaling.
 */
export class TokenProxyCluster extends Construct {
  readonly vpc: ec2.IVpc;
  readonly cluster: ecs.Cluster;
  readonly service: ecs.FargateService;
  readonly taskDefinition: ecs.FargateTaskDefinition;
  readonly loadBalancer: elbv2.ApplicationLoadBalancer;
  readonly targetGroup: elbv2.ApplicationTargetGroup;
  readonly serviceSecurityGroup: ec2.SecurityGroup;
  readonly loadBalancerSecurityGroup: ec2.SecurityGroup;
  readonly cache?: elasticache.CfnServerlessCache;
  /** With `redisIamAuth`: the proxy's IAM-authenticated ElastiCache user and its user group. */
  readonly redisIamUser?: elasticache.CfnUser;
  readonly redisUserGroup?: elasticache.CfnUserGroup;
  readonly cacheSecurityGroup?: ec2.SecurityGroup;
  readonly redisUrl: string;
  readonly rootSecret: secretsmanager.Secret;
  readonly adminTokenSecret: secretsmanager.Secret;
  readonly originVerifySecret?: secretsmanager.Secret;
  readonly upstreamHeadersSecret?: secretsmanager.Secret;
  readonly webAcl?: wafv2.CfnWebACL;
  readonly logGroup: logs.LogGroup;
  readonly metricsLogGroup?: logs.LogGroup;
  readonly alarms: TokenProxyAlarms;
  readonly metricsNamespace: string;

  constructor(scope: Construct, id: string, props: TokenProxyClusterProps) {
    super(scope, id);

    if (props.redisIamAuth && props.existingRedis) {
      throw new Error(
        'TokenProxyCluster: redisIamAuth applies to the cache the construct creates; for existingRedis, set ' +
          'TOKEN_PROXY_REDIS_IAM and its settings through `environment` and grant elasticache:Connect yourself.',
      );
    }
    const drainDelay = props.drainDelay ?? Duration.seconds(5);
    const upstreamTimeout = props.upstreamTimeout ?? Duration.seconds(10);
    const retention = props.logRetention ?? logs.RetentionDays.ONE_MONTH;
    const subnets = props.subnets ?? { subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS };
    this.metricsNamespace = props.metricsNamespace ?? 'TokenProxy';

    // ---- network ---------------------------------------------------------------------------
    this.vpc =
      props.vpc ??
      new ec2.Vpc(this, 'Vpc', {
        ipAddresses: ec2.IpAddresses.cidr(props.vpcCidr ?? '10.0.0.0/16'),
        maxAzs: 2,
        natGateways: 1,
        subnetConfiguration: [
          { name: 'public', subnetType: ec2.SubnetType.PUBLIC, cidrMask: 24 },
          { name: 'private', subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS, cidrMask: 22 },
        ],
      });
    if (!props.vpc) {
      acknowledge(this.vpc, [
        {
          id: 'AwsSolutions-VPC7',
          reason:
            'Flow logs cost money per GB and are a VPC-wide policy decision; pass your own VPC (props.vpc) with flow logs where they are required.',
        },
      ]);
    }

    this.loadBalancerSecurityGroup = new ec2.SecurityGroup(this, 'LoadBalancerSecurityGroup', {
      vpc: this.vpc,
      description: 'token-proxy load balancer: clients in, tasks out',
      allowAllOutbound: false,
    });
    this.serviceSecurityGroup = new ec2.SecurityGroup(this, 'ServiceSecurityGroup', {
      vpc: this.vpc,
      description: 'token-proxy tasks: the load balancer in; HTTPS and Redis out',
      allowAllOutbound: false,
    });
    const listenerPort = props.certificate ? 443 : 80;
    // The VPC's CIDR block as a literal where it is known, so that cdk-nag can check the rule.
    const vpcCidr = props.vpc ? this.vpc.vpcCidrBlock : (props.vpcCidr ?? '10.0.0.0/16');
    const clientPeer = props.clientPeer ?? ec2.Peer.ipv4(vpcCidr);
    if (Token.isUnresolved(clientPeer.uniqueId)) {
      acknowledge(this.loadBalancerSecurityGroup, [
        {
          id: 'AwsSolutions-EC23',
          reason:
            "The load balancer admits the existing VPC's own CIDR block (or the given clientPeer), not 0.0.0.0/0; it is a token at synthesis, which cdk-nag cannot evaluate.",
        },
      ]);
    }
    this.loadBalancerSecurityGroup.addIngressRule(clientPeer, ec2.Port.tcp(listenerPort), 'clients to the listener');
    for (const [port, what] of [
      [PROXY_PORT, 'token requests'],
      [ADMIN_PORT, 'health checks (/readyz)'],
    ] as const) {
      this.loadBalancerSecurityGroup.addEgressRule(this.serviceSecurityGroup, ec2.Port.tcp(port), `to the tasks: ${what}`);
      this.serviceSecurityGroup.addIngressRule(this.loadBalancerSecurityGroup, ec2.Port.tcp(port), `from the load balancer: ${what}`);
    }
    // Its only egress rules point at another group, so CDK renders them as separate resources
    // and leaves the group's own egress list empty, which EC2 reads as "all traffic anywhere".
    // The placeholder CDK itself uses for "no egress" keeps the list non-empty.
    (this.loadBalancerSecurityGroup.node.defaultChild as ec2.CfnSecurityGroup).addPropertyOverride('SecurityGroupEgress', [
      { CidrIp: '255.255.255.255/32', Description: 'Disallow all traffic', IpProtocol: 'icmp', FromPort: 252, ToPort: 86 },
    ]);
    // Cognito, ECR, Secrets Manager and CloudWatch Logs are reached over HTTPS (through the NAT
    // gateway, or VPC endpoints if the VPC has them): their addresses are not a fixed set.
    this.serviceSecurityGroup.addEgressRule(ec2.Peer.anyIpv4(), ec2.Port.tcp(443), 'HTTPS: token endpoint, ECR, Secrets Manager, CloudWatch');

    // ---- Redis -----------------------------------------------------------------------------
    if (props.existingRedis) {
      const r = props.existingRedis;
      checkRedisUrl(r.url, r.allowPlaintext ?? false);
      this.redisUrl = r.url;
      if (r.securityGroup) {
        this.serviceSecurityGroup.addEgressRule(r.securityGroup, ec2.Port.tcp(r.port), 'to Redis');
        r.securityGroup.addIngressRule(this.serviceSecurityGroup, ec2.Port.tcp(r.port), 'token-proxy tasks');
      } else {
        this.serviceSecurityGroup.addEgressRule(ec2.Peer.ipv4(this.vpc.vpcCidrBlock), ec2.Port.tcp(r.port), 'to Redis');
      }
    } else {
      this.cacheSecurityGroup = new ec2.SecurityGroup(this, 'CacheSecurityGroup', {
        vpc: this.vpc,
        description: 'token-proxy cache: the tasks in, nothing out',
        allowAllOutbound: false,
      });
      const cachePorts = ec2.Port.tcpRange(SERVERLESS_CACHE_PORT, SERVERLESS_CACHE_READER_PORT);
      this.cacheSecurityGroup.addIngressRule(this.serviceSecurityGroup, cachePorts, 'token-proxy tasks');
      this.serviceSecurityGroup.addEgressRule(this.cacheSecurityGroup, cachePorts, 'to the cache');
      const limits =
        props.cacheMaxDataStorageGb !== undefined || props.cacheMaxEcpuPerSecond !== undefined
          ? {
              dataStorage:
                props.cacheMaxDataStorageGb !== undefined ? { maximum: props.cacheMaxDataStorageGb, unit: 'GB' } : undefined,
              ecpuPerSecond:
                props.cacheMaxEcpuPerSecond !== undefined ? { maximum: props.cacheMaxEcpuPerSecond } : undefined,
            }
          : undefined;
      const cacheName = `${Stack.of(this).stackName}-${id}`.toLowerCase().replace(/[^a-z0-9-]+/g, '-').slice(0, 40).replace(/-+$/, '');
      if (props.redisIamAuth) {
        // IAM users need user id = user name; ids are lower case, at most 40 characters.
        const userId = `${cacheName.slice(0, 34)}-proxy`;
        this.redisIamUser = new elasticache.CfnUser(this, 'CacheUser', {
          engine: 'valkey',
          userId,
          userName: userId,
          authenticationMode: { Type: 'iam' },
          accessString: REDIS_ACCESS_STRING,
        });
        // A user group must hold a user named `default`: this one is switched off.
        const defaultUser = new elasticache.CfnUser(this, 'CacheDefaultUser', {
          engine: 'valkey',
          userId: `${cacheName.slice(0, 32)}-default`,
          userName: 'default',
          authenticationMode: { Type: 'no-password-required' },
          accessString: 'off -@all',
        });
        this.redisUserGroup = new elasticache.CfnUserGroup(this, 'CacheUserGroup', {
          engine: 'valkey',
          userGroupId: `${cacheName.slice(0, 34)}-users`,
          userIds: [this.redisIamUser.ref, defaultUser.ref],
        });
      }
      this.cache = new elasticache.CfnServerlessCache(this, 'Cache', {
        userGroupId: this.redisUserGroup?.ref,
        // Serverless caches always use TLS (in transit) and encrypt at rest.
        engine: 'valkey',
        majorEngineVersion: '8',
        serverlessCacheName: cacheName,
        description: 'token-proxy shared cache (sealed token responses, locks, announcements)',
        subnetIds: this.vpc.selectSubnets(subnets).subnetIds,
        securityGroupIds: [this.cacheSecurityGroup.securityGroupId],
        cacheUsageLimits: limits,
      });
      // No password in the URL: Serverless's default user, reached over TLS from the tasks only.
      // Serverless is cluster mode only (its keys are spread over slots), so a cluster URL.
      this.redisUrl = `rediss-cluster://${this.cache.attrEndpointAddress}:${this.cache.attrEndpointPort}`;
    }

    // ---- secrets ---------------------------------------------------------------------------
    this.rootSecret = new secretsmanager.Secret(this, 'RootSecret', {
      description: 'token-proxy TOKEN_PROXY_SECRET: the root secret of the cluster (cache key names and sealing keys)',
      // 44 characters of [A-Za-z0-9] are valid standard base64 of 33 bytes (262 bits of entropy).
      generateSecretString: { passwordLength: 44, excludePunctuation: true, includeSpace: false },
    });
    this.adminTokenSecret = new secretsmanager.Secret(this, 'AdminToken', {
      description: 'token-proxy TOKEN_PROXY_ADMIN_TOKEN: bearer token of the admin API (POST /admin/purge)',
      generateSecretString: { passwordLength: 40, excludePunctuation: true, includeSpace: false },
    });
    acknowledge([this.rootSecret, this.adminTokenSecret], [
      {
        id: 'AwsSolutions-SMG4',
        reason:
          'Rotating the root secret takes two rolling deploys with TOKEN_PROXY_PREVIOUS_SECRETS (README, Secret rotation); a Secrets Manager rotation Lambda would change it under running tasks. The admin token is rotated by the same manual procedure.',
      },
    ]);

    const secrets: Record<string, ecs.Secret> = {
      TOKEN_PROXY_SECRET: ecs.Secret.fromSecretsManager(this.rootSecret),
      TOKEN_PROXY_ADMIN_TOKEN: ecs.Secret.fromSecretsManager(this.adminTokenSecret),
    };
    if (props.previousSecrets) {
      secrets.TOKEN_PROXY_PREVIOUS_SECRETS = ecs.Secret.fromSecretsManager(props.previousSecrets);
    }

    // ---- WAF origin verify -----------------------------------------------------------------
    let originVerifyMarker: string | undefined;
    if (props.originVerify) {
      const ov = props.originVerify;
      const headerName = ov.headerName ?? 'X-Origin-Verify';
      if (!/^[A-Za-z0-9-]+$/.test(headerName)) {
        throw new Error(`TokenProxyCluster: originVerify.headerName ${JSON.stringify(headerName)} is not a header name`);
      }
      const rotation = ov.rotation ?? 'steady';
      // {"value": "<64 random characters>"}; during a rotation the operator adds "next".
      this.originVerifySecret = new secretsmanager.Secret(this, 'OriginVerifySecret', {
        description: `token-proxy origin-verify header value (${headerName}); JSON: {"value": current, "next": during a rotation}`,
        generateSecretString: {
          secretStringTemplate: '{}',
          generateStringKey: 'value',
          passwordLength: 64,
          excludePunctuation: true,
          includeSpace: false,
        },
      });
      const ref = (key: 'value' | 'next') =>
        `{{resolve:secretsmanager:${this.originVerifySecret!.secretArn}:SecretString:${key}}}`;
      // The tasks receive `TOKEN_PROXY_UPSTREAM_HEADERS` ("Name: value" lines) from this
      // secret, derived from the one above by CloudFormation at deploy time.
      this.upstreamHeadersSecret = new secretsmanager.Secret(this, 'UpstreamHeaders', {
        description: 'token-proxy TOKEN_PROXY_UPSTREAM_HEADERS ("Name: value" lines), derived from the origin-verify secret at deploy time',
        secretStringValue: SecretValue.unsafePlainText(`${headerName}: ${ref(rotation === 'send-next' ? 'next' : 'value')}`),
      });
      acknowledge([this.originVerifySecret, this.upstreamHeadersSecret], [
        {
          id: 'AwsSolutions-SMG4',
          reason:
            'The origin-verify value must change in the web ACL and the tasks in three ordered steps (accept both, send the new one, drop the old one); the construct drives them with the originVerify.rotation prop (README), which a rotation Lambda could not order.',
        },
      ]);
      secrets.TOKEN_PROXY_UPSTREAM_HEADERS = ecs.Secret.fromSecretsManager(this.upstreamHeadersSecret);
      originVerifyMarker = rotation;

      const headerMatches = (key: 'value' | 'next'): wafv2.CfnWebACL.StatementProperty => ({
        byteMatchStatement: {
          fieldToMatch: { singleHeader: { Name: headerName.toLowerCase() } },
          positionalConstraint: 'EXACTLY',
          searchString: ref(key),
          textTransformations: [{ priority: 0, type: 'NONE' }],
        },
      });
      const accepted: wafv2.CfnWebACL.StatementProperty =
        rotation === 'steady'
          ? headerMatches('value')
          : { orStatement: { statements: [headerMatches('value'), headerMatches('next')] } };
      this.webAcl = new wafv2.CfnWebACL(this, 'WebAcl', {
        scope: 'REGIONAL',
        description: 'token-proxy origin verify: /oauth2/token only with the secret header',
        defaultAction: { allow: {} },
        visibilityConfig: { cloudWatchMetricsEnabled: true, metricName: 'TokenProxyOriginVerify', sampledRequestsEnabled: false },
        rules: [
          {
            name: 'token-endpoint-requires-origin-verify',
            priority: 0,
            action: { block: {} },
            visibilityConfig: {
              cloudWatchMetricsEnabled: true,
              metricName: 'TokenProxyOriginVerifyBlocked',
              sampledRequestsEnabled: false,
            },
            statement: {
              andStatement: {
                statements: [
                  {
                    byteMatchStatement: {
                      fieldToMatch: { uriPath: {} },
                      positionalConstraint: 'EXACTLY',
                      searchString: '/oauth2/token',
                      textTransformations: [{ priority: 0, type: 'NONE' }],
                    },
                  },
                  { notStatement: { statement: accepted } },
                ],
              },
            },
          },
        ],
      });
      new wafv2.CfnWebACLAssociation(this, 'WebAclAssociation', {
        resourceArn: ov.userPoolArn,
        webAclArn: this.webAcl.attrArn,
      });
    }

    // ---- logs ------------------------------------------------------------------------------
    this.logGroup = new logs.LogGroup(this, 'Logs', { retention, removalPolicy: RemovalPolicy.RETAIN });

    // ---- ECS -------------------------------------------------------------------------------
    this.cluster = new ecs.Cluster(this, 'Cluster', {
      vpc: this.vpc,
      containerInsightsV2: ecs.ContainerInsights.ENABLED,
    });
    this.taskDefinition = new ecs.FargateTaskDefinition(this, 'Task', {
      cpu: props.cpu ?? 256,
      memoryLimitMiB: props.memoryLimitMiB ?? 512,
      runtimePlatform: {
        cpuArchitecture: props.cpuArchitecture ?? ecs.CpuArchitecture.ARM64,
        operatingSystemFamily: ecs.OperatingSystemFamily.LINUX,
      },
    });
    if (this.redisIamUser && this.cache) {
      // The token the replicas sign opens this cache as this user, and nothing else.
      this.taskDefinition.addToTaskRolePolicy(
        new iam.PolicyStatement({
          actions: ['elasticache:Connect'],
          resources: [this.cache.attrArn, this.redisIamUser.attrArn],
        }),
      );
    }
    const environment: Record<string, string> = {
      ...upstreamEnvironment(props),
      TOKEN_PROXY_LISTEN: `0.0.0.0:${PROXY_PORT}`,
      // Not the loopback default: the load balancer checks /readyz on the task's address.
      TOKEN_PROXY_ADMIN_LISTEN: `0.0.0.0:${ADMIN_PORT}`,
      TOKEN_PROXY_REDIS_URL: this.redisUrl,
      TOKEN_PROXY_DRAIN_DELAY: `${drainDelay.toSeconds()}s`,
      TOKEN_PROXY_UPSTREAM_TIMEOUT: `${upstreamTimeout.toSeconds()}s`,
      // The load balancer's address is the connection's source: the client is the last
      // X-Forwarded-For hop it added (per-source limits and auth-failure throttling).
      TOKEN_PROXY_TRUSTED_PROXIES: this.vpc.vpcCidrBlock,
      TOKEN_PROXY_LOG_FORMAT: 'json',
      // The load balancer reuses idle connections to the targets for up to its idle timeout; the
      // replica must not close them first (it closes idle keep-alive connections after the
      // header-read timeout, 5 s by default), or a request sent on a closing connection is a 502.
      // The load balancer reads whole headers itself, so the slow-header defence loses nothing.
      TOKEN_PROXY_HEADER_READ_TIMEOUT: `${LOAD_BALANCER_IDLE_TIMEOUT_SECONDS + 5}s`,
      ...(this.redisIamUser && this.cache
        ? {
            TOKEN_PROXY_REDIS_IAM: 'elasticache-serverless',
            TOKEN_PROXY_REDIS_IAM_USER: this.redisIamUser.userId,
            TOKEN_PROXY_REDIS_IAM_CACHE: this.cache.serverlessCacheName,
            TOKEN_PROXY_REDIS_IAM_REGION: Stack.of(this).region,
          }
        : {}),
      ...(props.environment ?? {}),
    };
    for (const name of Object.keys(props.environment ?? {})) {
      if (UPSTREAM_VARIABLES.includes(name)) {
        throw new Error(`TokenProxyCluster: ${name} comes from the upstreamUrl or upstreams prop, not environment`);
      }
      if (/SECRET|TOKEN$|PASSWORD|HEADERS$/.test(name) && !name.endsWith('_FILE')) {
        throw new Error(`TokenProxyCluster: ${name} looks secret: it must not be a plain environment value`);
      }
    }
    if (originVerifyMarker) {
      // Not a token-proxy setting: a change of rotation step changes the task definition, so
      // new tasks start and read the header secret again.
      environment.ORIGIN_VERIFY_ROTATION_STEP = originVerifyMarker;
    }
    const container = this.taskDefinition.addContainer('token-proxy', {
      image: props.image,
      essential: true,
      user: '10001:10001',
      readonlyRootFilesystem: true,
      environment,
      secrets,
      portMappings: [
        { containerPort: PROXY_PORT, name: 'proxy' },
        { containerPort: ADMIN_PORT, name: 'admin' },
      ],
      logging: ecs.LogDrivers.awsLogs({ logGroup: this.logGroup, streamPrefix: 'token-proxy' }),
      // SIGTERM: /readyz turns 503 and both listeners keep serving for the drain delay, then
      // in-flight requests finish (up to the upstream timeout): the stop timeout covers both.
      stopTimeout: Duration.seconds(Math.min(120, drainDelay.toSeconds() + upstreamTimeout.toSeconds() + 5)),
    });

    if (props.cloudWatchAgent ?? true) {
      this.metricsLogGroup = new logs.LogGroup(this, 'MetricsLogs', { retention, removalPolicy: RemovalPolicy.DESTROY });
      const agentLogs = new logs.LogGroup(this, 'AgentLogs', { retention, removalPolicy: RemovalPolicy.DESTROY });
      this.taskDefinition.addContainer('cloudwatch-agent', {
        image: ecs.ContainerImage.fromRegistry(
          props.cloudWatchAgentImage ?? DEFAULT_CLOUDWATCH_AGENT_IMAGE,
        ),
        essential: false,
        memoryReservationMiB: 64,
        environment: {
          CW_CONFIG_CONTENT: JSON.stringify(cloudWatchAgentConfig(this.metricsNamespace, this.metricsLogGroup.logGroupName)),
          PROMETHEUS_CONFIG_CONTENT: prometheusScrapeConfig(this.cluster.clusterName),
        },
        logging: ecs.LogDrivers.awsLogs({ logGroup: agentLogs, streamPrefix: 'cloudwatch-agent' }),
      });
      this.taskDefinition.addToTaskRolePolicy(
        new iam.PolicyStatement({
          actions: ['logs:CreateLogStream', 'logs:PutLogEvents', 'logs:DescribeLogStreams', 'logs:DescribeLogGroups'],
          resources: [this.metricsLogGroup.logGroupArn],
        }),
      );
    }
    acknowledge(
      this.taskDefinition,
      [
        {
          id: 'AwsSolutions-ECS2',
          reason:
            'Only non-secret settings (addresses, timeouts, the Redis URL without credentials, the agent configuration) are environment values; every secret is an ECS secret from Secrets Manager (checked by the tests).',
        },
        {
          id: 'AwsSolutions-IAM5[Resource::*]',
          reason:
            'The execution role\'s ecr:GetAuthorizationToken has no resource-level permissions (Resource "*"); every other grant is scoped to this construct\'s resources.',
        },
      ],
    );

    this.service = new ecs.FargateService(this, 'Service', {
      cluster: this.cluster,
      taskDefinition: this.taskDefinition,
      desiredCount: props.desiredCount ?? 2,
      securityGroups: [this.serviceSecurityGroup],
      vpcSubnets: subnets,
      assignPublicIp: false,
      minHealthyPercent: 100,
      maxHealthyPercent: 200,
      circuitBreaker: { rollback: true },
    });

    // ---- load balancer ---------------------------------------------------------------------
    this.loadBalancer = new elbv2.ApplicationLoadBalancer(this, 'LoadBalancer', {
      vpc: this.vpc,
      internetFacing: false,
      vpcSubnets: subnets,
      securityGroup: this.loadBalancerSecurityGroup,
      dropInvalidHeaderFields: true,
      // Longer than the slowest answer (the upstream timeout), shorter than the replicas' idle timeout.
      idleTimeout: Duration.seconds(LOAD_BALANCER_IDLE_TIMEOUT_SECONDS),
    });
    if (upstreamTimeout.toSeconds() + 5 > LOAD_BALANCER_IDLE_TIMEOUT_SECONDS) {
      throw new Error(
        `TokenProxyCluster: upstreamTimeout must be at most ${LOAD_BALANCER_IDLE_TIMEOUT_SECONDS - 5} s (the load balancer's idle timeout less 5 s)`,
      );
    }
    if (props.accessLogBucket) {
      this.loadBalancer.logAccessLogs(props.accessLogBucket, 'token-proxy');
    } else {
      acknowledge(this.loadBalancer, [
        {
          id: 'AwsSolutions-ELB2',
          reason:
            'Access logs need an S3 bucket the operator owns (props.accessLogBucket); token-proxy logs every request itself with TOKEN_PROXY_ACCESS_LOG.',
        },
      ]);
    }
    const listener = this.loadBalancer.addListener('Listener', {
      port: listenerPort,
      protocol: props.certificate ? elbv2.ApplicationProtocol.HTTPS : elbv2.ApplicationProtocol.HTTP,
      certificates: props.certificate ? [props.certificate] : undefined,
      sslPolicy: props.certificate ? elbv2.SslPolicy.RECOMMENDED_TLS : undefined,
      open: false,
    });
    this.targetGroup = listener.addTargets('Proxy', {
      port: PROXY_PORT,
      protocol: elbv2.ApplicationProtocol.HTTP,
      targets: [this.service.loadBalancerTarget({ containerName: container.containerName, containerPort: PROXY_PORT })],
      // ECS deregisters a task first, waits for this, then sends SIGTERM; the proxy's own drain
      // delay then keeps it serving what still arrives. The same value for both.
      deregistrationDelay: drainDelay,
      healthCheck: {
        path: '/readyz',
        port: String(ADMIN_PORT),
        protocol: elbv2.Protocol.HTTP,
        healthyHttpCodes: '200',
        interval: Duration.seconds(5),
        timeout: Duration.seconds(2),
        healthyThresholdCount: 2,
        unhealthyThresholdCount: 2,
      },
    });

    // ---- autoscaling -----------------------------------------------------------------------
    const scaling = this.service.autoScaleTaskCount({
      minCapacity: props.minCapacity ?? props.desiredCount ?? 2,
      maxCapacity: props.maxCapacity ?? 10,
    });
    scaling.scaleOnCpuUtilization('Cpu', {
      targetUtilizationPercent: props.targetCpuUtilizationPercent ?? 50,
      scaleInCooldown: Duration.seconds(120),
      scaleOutCooldown: Duration.seconds(30),
    });
    scaling.scaleOnRequestCount('Requests', {
      requestsPerTarget: props.targetRequestsPerTarget ?? 6000,
      targetGroup: this.targetGroup,
      scaleInCooldown: Duration.seconds(120),
      scaleOutCooldown: Duration.seconds(30),
    });

    // ---- alarms ----------------------------------------------------------------------------
    this.alarms = this.makeAlarms(props.minHitRatioPercent ?? 50);
  }

  /** A token_proxy_* metric as the CloudWatch agent sidecar publishes it. */
  proxyMetric(name: string, dimensions: Record<string, string> = {}, statistic = 'Sum', period = Duration.minutes(1)) {
    return new cloudwatch.Metric({
      namespace: this.metricsNamespace,
      metricName: name,
      dimensionsMap: { ClusterName: this.cluster.clusterName, ...dimensions },
      statistic,
      period,
    });
  }

  private makeAlarms(minHitRatio: number): TokenProxyAlarms {
    const upstream = (statusClass: string) =>
      this.proxyMetric('token_proxy_upstream_requests_total', { status_class: statusClass });
    const outcome = (o: string, period = Duration.minutes(1)) =>
      this.proxyMetric('token_proxy_requests_total', { outcome: o }, 'Sum', period);
    const notBreaching = cloudwatch.TreatMissingData.NOT_BREACHING;

    const upstreamErrors = new cloudwatch.MathExpression({
      expression: 'FILL(e5, 0) + FILL(et, 0) + FILL(ee, 0)',
      usingMetrics: { e5: upstream('5xx'), et: upstream('timeout'), ee: upstream('error') },
      period: Duration.minutes(1),
      label: 'upstream 5xx, timeouts and connection errors',
    }).createAlarm(this, 'UpstreamErrorsAlarm', {
      alarmDescription: 'token-proxy: the token endpoint fails (5xx, timeouts, connection errors) - token_proxy_upstream_requests_total{status_class!="2xx"}',
      threshold: 5,
      evaluationPeriods: 5,
      datapointsToAlarm: 3,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
      treatMissingData: notBreaching,
    });
    const staleServes = outcome('stale').createAlarm(this, 'StaleServesAlarm', {
      alarmDescription: 'token-proxy serves tokens on borrowed time (the upstream failed) - token_proxy_requests_total{outcome="stale"}',
      threshold: 1,
      evaluationPeriods: 3,
      datapointsToAlarm: 2,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
      treatMissingData: notBreaching,
    });
    const breakerOpen = this.proxyMetric('token_proxy_redis_breaker_open', {}, 'Maximum').createAlarm(this, 'BreakerOpenAlarm', {
      alarmDescription: 'token-proxy: a replica has had its Redis circuit breaker open for more than a minute (degraded mode) - token_proxy_redis_breaker_open == 1',
      threshold: 1,
      evaluationPeriods: 2,
      datapointsToAlarm: 2,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
      treatMissingData: notBreaching,
    });
    const lockTakeovers = this.proxyMetric('token_proxy_lock_takeovers_total', {}, 'Sum', Duration.minutes(5)).createAlarm(
      this,
      'LockTakeoversAlarm',
      {
        alarmDescription: 'token-proxy: replicas died while holding single-flight locks - rate(token_proxy_lock_takeovers_total[5m]) > 0',
        threshold: 0,
        evaluationPeriods: 1,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        treatMissingData: notBreaching,
      },
    );
    const hitRatio = new cloudwatch.MathExpression({
      // Requests answered from a cache (hit, coalesced, stale) out of those that wanted a token;
      // no data while there is no traffic (the alarm treats missing data as fine).
      expression: 'IF(h + c + s + m > 20, 100 * (h + c + s) / (h + c + s + m))',
      usingMetrics: {
        h: fillZero(outcome('hit', Duration.minutes(5)), 'h'),
        c: fillZero(outcome('coalesced', Duration.minutes(5)), 'c'),
        s: fillZero(outcome('stale', Duration.minutes(5)), 's'),
        m: fillZero(outcome('miss', Duration.minutes(5)), 'm'),
      },
      period: Duration.minutes(5),
      label: 'hit ratio (%)',
    });
    const hitRatioAlarm = hitRatio.createAlarm(this, 'HitRatioAlarm', {
      alarmDescription: `token-proxy: fewer than ${minHitRatio} % of token requests are served from the cache`,
      threshold: minHitRatio,
      evaluationPeriods: 3,
      comparisonOperator: cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
      treatMissingData: notBreaching,
    });
    // Wired without the agent: the load balancer's own metrics.
    const unhealthyTargets = this.targetGroup.metrics
      .unhealthyHostCount({ period: Duration.minutes(1), statistic: 'Maximum' })
      .createAlarm(this, 'UnhealthyTargetsAlarm', {
        alarmDescription: 'token-proxy: tasks fail /readyz on the admin port',
        threshold: 1,
        evaluationPeriods: 3,
        datapointsToAlarm: 2,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
        treatMissingData: notBreaching,
      });
    const target5xx = this.targetGroup.metrics
      .httpCodeTarget(elbv2.HttpCodeTarget.TARGET_5XX_COUNT, { period: Duration.minutes(1), statistic: 'Sum' })
      .createAlarm(this, 'Target5xxAlarm', {
        alarmDescription: 'token-proxy answers 5xx (upstream 502/503/504 mapped, or overload 503)',
        threshold: 10,
        evaluationPeriods: 5,
        datapointsToAlarm: 3,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
        treatMissingData: notBreaching,
      });
    return { upstreamErrors, staleServes, breakerOpen, lockTakeovers, hitRatio: hitRatioAlarm, unhealthyTargets, target5xx };
  }
}

/** The metric with no data counted as 0; `id` names the raw series (ids must be unique in an alarm). */
function fillZero(metric: cloudwatch.Metric, id: string): cloudwatch.IMetric {
  return new cloudwatch.MathExpression({ expression: `FILL(${id}raw, 0)`, usingMetrics: { [`${id}raw`]: metric }, period: metric.period });
}

/** Refuses a Redis URL that carries credentials (it is a plain environment value) or no TLS. */
export function checkRedisUrl(url: string, allowPlaintext: boolean): void {
  const m = /^([a-z-]+):\/\/([^/?#]*)/.exec(url);
  const schemes = ['redis', 'rediss', 'redis-sentinel', 'rediss-sentinel', 'redis-cluster', 'rediss-cluster'];
  if (!m || !schemes.includes(m[1])) {
    throw new Error(
      'TokenProxyCluster: existingRedis.url must start with rediss://, rediss-cluster:// or rediss-sentinel:// ' +
        '(or their plain redis forms)',
    );
  }
  if (m[2].includes('@')) {
    throw new Error(
      'TokenProxyCluster: existingRedis.url must not carry credentials (it is a plain environment value); ' +
        'use TLS and security groups, or TOKEN_PROXY_REDIS_PASSWORD_FILE from a secret once available',
    );
  }
  if (m[1] === 'redis' && !allowPlaintext) {
    throw new Error('TokenProxyCluster: existingRedis.url is redis:// (no TLS); use rediss:// or set allowPlaintext');
  }
}

/** The CloudWatch agent: scrape the task's /metrics, publish the alert metrics as EMF. */
export function cloudWatchAgentConfig(namespace: string, logGroupName: string) {
  const dims = (label?: string) => (label ? [['ClusterName'], ['ClusterName', label]] : [['ClusterName']]);
  return {
    agent: { debug: false },
    logs: {
      metrics_collected: {
        prometheus: {
          prometheus_config_path: 'env:PROMETHEUS_CONFIG_CONTENT',
          log_group_name: logGroupName,
          emf_processor: {
            metric_namespace: namespace,
            metric_declaration: [
              {
                source_labels: ['job'],
                label_matcher: '^token-proxy$',
                dimensions: [['ClusterName', 'outcome']],
                metric_selectors: ['^token_proxy_requests_total$'],
              },
              {
                source_labels: ['job'],
                label_matcher: '^token-proxy$',
                dimensions: [['ClusterName', 'status_class']],
                metric_selectors: ['^token_proxy_upstream_requests_total$'],
              },
              {
                source_labels: ['job'],
                label_matcher: '^token-proxy$',
                dimensions: dims(),
                metric_selectors: [
                  '^token_proxy_redis_breaker_open$',
                  '^token_proxy_redis_errors_total$',
                  '^token_proxy_lock_takeovers_total$',
                  '^token_proxy_upstream_calls_avoided_total$',
                  '^token_proxy_coalesced_waiters_total$',
                ],
              },
            ],
          },
        },
      },
      force_flush_interval: 5,
    },
  };
}

/** The variables `upstreamEnvironment` sets: `environment` may not. */
const UPSTREAM_VARIABLES = ['TOKEN_PROXY_UPSTREAM_URL', 'TOKEN_PROXY_CONFIG', 'TOKEN_PROXY_CONFIG_TOML'];

/**
 * Where the tasks' upstreams come from: TOKEN_PROXY_UPSTREAM_URL for one, or for several the
 * text of a configuration file with one `[upstreams.NAME]` table each (ECS hands a container
 * environment variables, not files). Values must be known at synthesis (no tokens): the text is
 * checked here, not at deploy time. Every mistake is refused at synthesis.
 */
export function upstreamEnvironment(
  props: Pick<TokenProxyClusterProps, 'upstreamUrl' | 'upstreams' | 'defaultUpstream' | 'originVerify'>,
): Record<string, string> {
  const fail = (message: string): never => {
    throw new Error(`TokenProxyCluster: ${message}`);
  };
  const names = Object.keys(props.upstreams ?? {});
  if ((props.upstreamUrl === undefined) === (props.upstreams === undefined)) {
    fail('give either upstreamUrl (one token endpoint) or upstreams (several by name)');
  }
  if (props.upstreamUrl !== undefined) {
    if (props.defaultUpstream !== undefined) fail('defaultUpstream needs upstreams');
    return { TOKEN_PROXY_UPSTREAM_URL: props.upstreamUrl };
  }
  if (names.length === 0) fail('upstreams names no upstream');
  if (props.defaultUpstream !== undefined && !names.includes(props.defaultUpstream)) {
    fail(`defaultUpstream "${props.defaultUpstream}" is not one of upstreams (${names.join(', ')})`);
  }
  const literal = (what: string, value: unknown) => {
    if (Token.isUnresolved(value)) fail(`${what} must be known at synthesis, not a deploy-time token`);
  };
  const verified = names.filter((name) => props.upstreams![name].originVerify);
  if (props.originVerify !== undefined && verified.length !== 1) {
    fail(`with originVerify, exactly one of upstreams must be the protected user pool (originVerify: true); found ${verified.length}`);
  }
  if (props.originVerify === undefined && verified.length > 0) fail('an upstream has originVerify, but the construct has no originVerify');
  literal('defaultUpstream', props.defaultUpstream);
  // A TOML basic string: JSON's escapes are TOML's. Unresolved tokens stay placeholders here and
  // are joined into the value by CloudFormation.
  const str = (value: string) => JSON.stringify(value);
  const lines = ['# TokenProxyCluster: named upstreams (README, "Several user pools or IdPs")'];
  if (props.defaultUpstream !== undefined) lines.push(`default_upstream = ${str(props.defaultUpstream)}`);
  for (const name of names) {
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(name)) fail(`upstream name "${name}": letters, digits, - and _ only, at most 64`);
    const upstream = props.upstreams![name];
    literal(`upstreams.${name}.url`, upstream.url);
    lines.push('', `[upstreams.${name}]`, `url = ${str(upstream.url)}`);
    // The origin-verify header (TOKEN_PROXY_UPSTREAM_HEADERS) goes to the protected pool only.
    if (props.originVerify !== undefined && !upstream.originVerify) lines.push('headers = ""');
    const count = (key: string, value: number | undefined) => {
      if (value === undefined) return;
      literal(`upstreams.${name}.${key}`, value);
      if (!Number.isInteger(value) || value < 0) fail(`upstreams.${name}.${key} must be a whole number`);
      lines.push(`${key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)} = ${value}`);
    };
    count('clientCallBudget', upstream.clientCallBudget);
    count('rateLimit', upstream.rateLimit);
    if (upstream.clientCallBudgetWindow !== undefined) {
      if (upstream.clientCallBudgetWindow.isUnresolved()) fail(`upstreams.${name}.clientCallBudgetWindow must be known at synthesis, not a deploy-time token`);
      lines.push(`client_call_budget_window = "${upstream.clientCallBudgetWindow.toSeconds()}s"`);
    }
  }
  return { TOKEN_PROXY_CONFIG_TOML: lines.join('\n') + '\n' };
}

/** Prometheus scrape configuration of the sidecar: the task's own admin port. */
export function prometheusScrapeConfig(clusterName: string): string {
  // The task's containers share one network namespace (awsvpc): localhost is the proxy.
  // ClusterName is a static label (the alarms' dimension); `job` selects the declarations above.
  return [
    'global:',
    '  scrape_interval: 30s',
    '  scrape_timeout: 10s',
    'scrape_configs:',
    '  - job_name: token-proxy',
    '    metrics_path: /metrics',
    '    static_configs:',
    `      - targets: ["localhost:${ADMIN_PORT}"]`,
    '        labels:',
    `          ClusterName: "${clusterName}"`,
    '',
  ].join('\n');
}

/** cdk-nag findings this construct accepts, each with its reason (cdk-nag v3: CDK's Validations). */
function acknowledge(scopes: Construct | Construct[], findings: { id: string; reason: string }[]): void {
  for (const scope of Array.isArray(scopes) ? scopes : [scopes]) {
    for (const f of findings) {
      Validations.of(scope).acknowledge(f);
    }
  }
}
