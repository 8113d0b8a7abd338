#!/usr/bin/env node
// The example app: one TokenProxyCluster in its own stack, checked by cdk-nag's AwsSolutions
// rules at synthesis. Environment-agnostic (no account or region, no context lookups): it
// synthesizes offline and without credentials.
//
//   npx --no-install cdk synth
//   npx --no-install cdk deploy \
//     -c upstreamUrl=https://DOMAIN.auth.REGION.amazoncognito.com/oauth2/token \
//     -c userPoolId=REGION_POOLID \
//     -c image=ACCOUNT.dkr.ecr.REGION.amazonaws.com/token-proxy:TAG
//
// Context (cdk.json or -c): upstreamUrl, userPoolId (turns on the WAF origin verify; "none"
// = off), image (default: built from the repository's Dockerfile at deploy time),
// architecture (arm64 | x86_64), originVerifyRotation (steady | accept-next | send-next),
// upstreams (several token endpoints instead of upstreamUrl, as JSON:
// '{"orders":{"url":"https://..."},"partners":{"url":"https://...","clientCallBudget":500,
// "clientCallBudgetWindow":3600}}', the window in seconds; with userPoolId, mark the protected
// pool "originVerify":true) and defaultUpstream (the one /oauth2/token reaches).
import * as path from 'path';
import { App, CfnOutput, Duration, Stack, StackProps, Validations, aws_ecr_assets as ecrAssets, aws_ecs as ecs } from 'aws-cdk-lib';
import { AwsSolutionsChecks } from 'cdk-nag';
import { Construct } from 'constructs';
import { TokenProxyCluster, UpstreamProps } from '../lib';

/** The `upstreams` context (JSON from -c, or an object in cdk.json), the budget's window in seconds. */
function parseUpstreams(context: unknown): Record<string, UpstreamProps> {
  const parsed = (typeof context === 'string' ? JSON.parse(context) : context) as Record<
    string,
    { url: string; clientCallBudget?: number; clientCallBudgetWindow?: number; rateLimit?: number; originVerify?: boolean }
  >;
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new Error('the upstreams context must be an object: {"NAME": {"url": "https://..."}, ...}');
  }
  return Object.fromEntries(
    Object.entries(parsed).map(([name, { clientCallBudgetWindow, ...rest }]) => [
      name,
      { ...rest, clientCallBudgetWindow: clientCallBudgetWindow === undefined ? undefined : Duration.seconds(clientCallBudgetWindow) },
    ]),
  );
}

export class TokenProxyExampleStack extends Stack {
  readonly proxy: TokenProxyCluster;

  constructor(scope: Construct, id: string, props: StackProps = {}) {
    super(scope, id, props);
    const ctx = (key: string, fallback: string): string => String(this.node.tryGetContext(key) ?? fallback);

    const image = this.node.tryGetContext('image') as string | undefined;
    const arch = ctx('architecture', 'arm64');
    const userPoolId = ctx('userPoolId', 'none');
    const rotation = ctx('originVerifyRotation', 'steady') as 'steady' | 'accept-next' | 'send-next';
    const upstreams: unknown = this.node.tryGetContext('upstreams');

    this.proxy = new TokenProxyCluster(this, 'TokenProxy', {
      image: image
        ? ecs.ContainerImage.fromRegistry(image)
        : ecs.ContainerImage.fromAsset(path.join(__dirname, '..', '..', '..', '..'), {
            // the repository root (from dist/bin); what the Dockerfile needs, not node_modules
            exclude: ['deploy/cdk/node_modules', 'deploy/cdk/cdk.out', 'deploy/cdk/cdk.out.pools', 'deploy/cdk/dist', 'deploy/.venv', 'deploy/kubernetes/.render-*', 'target', '.git', 'loadtest/out'],
            // the tasks' architecture (docker buildx builds the other one under emulation)
            platform: arch === 'x86_64' ? ecrAssets.Platform.LINUX_AMD64 : ecrAssets.Platform.LINUX_ARM64,
          }),
      ...(upstreams
        ? { upstreams: parseUpstreams(upstreams), defaultUpstream: this.node.tryGetContext('defaultUpstream') }
        : { upstreamUrl: ctx('upstreamUrl', 'https://example.auth.eu-west-1.amazoncognito.com/oauth2/token') }),
      cpuArchitecture: arch === 'x86_64' ? ecs.CpuArchitecture.X86_64 : ecs.CpuArchitecture.ARM64,
      originVerify:
        userPoolId === 'none'
          ? undefined
          : {
              userPoolArn: this.formatArn({ service: 'cognito-idp', resource: 'userpool', resourceName: userPoolId }),
              rotation,
            },
      // The cache is opened with IAM tokens (context redisIamAuth=false: TLS and security groups only).
      redisIamAuth: ctx('redisIamAuth', 'true') !== 'false',
    });

    // What your services call instead of Cognito (inside the VPC): /oauth2/token for one upstream
    // (or the default one), /NAME/oauth2/token for each named upstream.
    const base = `http://${this.proxy.loadBalancer.loadBalancerDnsName}`;
    const defaultUpstream = this.node.tryGetContext('defaultUpstream');
    if (!upstreams || defaultUpstream) {
      new CfnOutput(this, 'TokenEndpoint', {
        description: 'What your services call instead of Cognito (inside the VPC)',
        value: `${base}/oauth2/token`,
      });
    }
    for (const name of upstreams ? Object.keys(parseUpstreams(upstreams)) : []) {
      new CfnOutput(this, `TokenEndpoint-${name}`, { description: `Upstream ${name}`, value: `${base}/${name}/oauth2/token` });
    }
    new CfnOutput(this, 'RootSecretArn', { value: this.proxy.rootSecret.secretArn });
    new CfnOutput(this, 'AdminTokenSecretArn', { value: this.proxy.adminTokenSecret.secretArn });
    if (this.proxy.originVerifySecret) {
      new CfnOutput(this, 'OriginVerifySecretArn', { value: this.proxy.originVerifySecret.secretArn });
    }
  }
}

const app = new App();
new TokenProxyExampleStack(app, 'TokenProxy', {
  description: 'token-proxy: a caching proxy for OAuth2 client-credentials token endpoints (example app)',
});
// Any finding not acknowledged with a reason interrupts synthesis.
Validations.of(app).addPlugins(new AwsSolutionsChecks(app, { verbose: true }));
app.synth();
