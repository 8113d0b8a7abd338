export * from './token-proxy-cluster';
