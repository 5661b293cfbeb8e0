/**
 * Encryption between hosts: with TRELLIS_TLS_CERT, TRELLIS_TLS_KEY and TRELLIS_TLS_CA set (here
 * a test CA's files), a broker, a host (a separate process) and this driver speak mutual TLS,
 * as do the lent node's workers and the objects moving between stores; a peer without a
 * certificate of the cluster's CA gets nowhere, and half a configuration is refused, saying so.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Broker, brokerStatus, get, init, put, shutdown, state } from '../../lib/index.js';
import { checksum, makeArray, whereAmI } from './fixtures/nodes.js';
import { rejection, trellisCli } from './helpers.js';

const TOKEN = 'tls-test-token';
const fixtures = join(import.meta.dirname, 'fixtures/tls');
const credentials = (name: string) => ({
  TRELLIS_TLS_CERT: join(fixtures, `${name}.pem`),
  TRELLIS_TLS_KEY: join(fixtures, `${name}.key`),
  TRELLIS_TLS_CA: join(fixtures, `${name}-ca.pem`),
});

function useCredentials(values: Record<string, string | undefined>): void {
  for (const [name, value] of Object.entries(values)) {
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
  }
}

describe('TLS between hosts', () => {
  let broker: Broker;
  let host: ChildProcess;
  let address: string;

  beforeAll(async () => {
    useCredentials(credentials('cluster'));
    broker = await Broker.start({ host: '127.0.0.1', port: 0, token: TOKEN });
    address = `127.0.0.1:${broker.port}`;
    host = spawn(process.execPath, [...trellisCli, 'node', '--broker', address, '--id', 'tls-host', '--num-cpus', '1', '--object-store-memory', String(64 * 1024 * 1024)], {
      env: { ...process.env, TRELLIS_CLUSTER_TOKEN: TOKEN },
      stdio: ['ignore', 'inherit', 'inherit'],
    });
    while ((await brokerStatus(address, { token: TOKEN })).hosts.length === 0) await new Promise((resolve) => setTimeout(resolve, 50));
  }, 60_000);

  afterAll(async () => {
    await shutdown();
    host?.kill('SIGTERM');
    await broker?.close();
    useCredentials({ TRELLIS_TLS_CERT: undefined, TRELLIS_TLS_KEY: undefined, TRELLIS_TLS_CA: undefined });
  });

  it('runs a driver on a lent node, objects moving both ways, all over mutual TLS', async () => {
    await init({ cluster: { address, token: TOKEN, resources: { CPU: 1 } } });
    const lent = state().nodes.find((node) => node.nodeId !== 'node-0')!.nodeId;
    expect((await get(whereAmI.remote())).nodeId).toBe(lent);
    // 8 MB made there and read here; 8 MB put here and read there.
    const made = makeArray.remote(1_000_000, 2);
    const values = await get(made);
    expect(values.length).toBe(1_000_000);
    expect(values[999_999]).toBe(2 + 999_999 * 0.5);
    const result = await get(checksum.remote(put(values)));
    expect(result).toMatchObject({ length: 1_000_000, nodeId: lent });
    await shutdown();
  });

  it('gives nothing to a peer without a certificate of the cluster CA', async () => {
    // Plain TCP: the handshake never happens, so nothing comes back and the connection closes.
    const socket = connect({ host: '127.0.0.1', port: broker.port });
    const answered = await new Promise<boolean>((resolve) => {
      socket.once('data', () => resolve(true));
      socket.once('close', () => resolve(false));
      socket.once('connect', () => socket.write(Buffer.from('plain bytes that are not a TLS hello\n')));
    });
    socket.destroy();
    expect(answered).toBe(false);
    // A certificate another CA signed.
    useCredentials(credentials('other'));
    try {
      const error = await rejection(brokerStatus(address, { token: TOKEN }));
      expect(error.code).toBe('ERR_BROKER_UNREACHABLE');
    } finally {
      useCredentials(credentials('cluster'));
    }
    // Half a configuration.
    useCredentials({ TRELLIS_TLS_KEY: undefined });
    try {
      const error = await rejection(brokerStatus(address, { token: TOKEN }));
      expect(error.code).toBe('ERR_TLS_CONFIG');
      expect(error.message).toMatch(/TRELLIS_TLS_KEY is not set/);
    } finally {
      useCredentials(credentials('cluster'));
    }
  });
});
