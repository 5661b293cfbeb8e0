/**
 * A shared cluster's broker, how it lends: hosts and drivers here are bare connections speaking
 * its protocol (no processes), so each test sets up exactly the state it asks about. Gangs are
 * lent all at once or not at all, oldest first; drivers that take what fits share by the smallest
 * share held; a request past the backfill window is not jumped; a slice comes back only when its
 * host says its session ended; a host's loss asks for its bundles again; bad hellos are refused.
 */
import { connect, createServer, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { Broker, brokerStatus, ClusterError, HostAgent, NodeAgent } from '../../lib/index.js';
import { AGENT_PROTOCOL } from '../../lib/core/agent-protocol.js';
import type { BrokerInbound, BrokerOutbound, OpenSessionMessage } from '../../lib/core/broker-protocol.js';
import { FrameConnection } from '../../lib/core/connection.js';
import { rejection, until } from './helpers.js';

const TOKEN = 'broker-test-token';

interface Peer {
  connection: FrameConnection<BrokerOutbound, BrokerInbound>;
  messages: BrokerOutbound[];
  closed: boolean;
  of<T extends BrokerOutbound['t']>(type: T): Extract<BrokerOutbound, { t: T }>[];
}

async function peer(broker: Broker, hello: BrokerInbound): Promise<Peer> {
  const socket = connect({ host: '127.0.0.1', port: broker.port });
  await new Promise((resolve) => socket.once('connect', resolve));
  const result: Peer = {
    messages: [],
    closed: false,
    connection: undefined!,
    of: (type) => result.messages.filter((message) => message.t === type) as never,
  };
  result.connection = new FrameConnection<BrokerOutbound, BrokerInbound>(socket, (message) => result.messages.push(message), () => (result.closed = true));
  result.connection.send(hello);
  await until(() => result.messages.length > 0 || result.closed, 'the broker to answer');
  return result;
}

function host(broker: Broker, hostId: string, resources: Record<string, number>, gpus: number[] = []): Promise<Peer> {
  return peer(broker, { t: 'host-hello', token: TOKEN, protocol: AGENT_PROTOCOL, hostId, hostname: hostId, resources, gpus, sessions: [] });
}

function driver(broker: Broker, name: string, bundles: Record<string, number>[], wait: 'all' | 'any' = 'all', token = TOKEN, priority?: number): Promise<Peer> {
  return peer(broker, { t: 'driver-hello', token, protocol: AGENT_PROTOCOL, name, bundles, wait, listen: { port: 4000, token: `${name}-secret` }, ...(priority !== undefined ? { priority } : {}) });
}

/** A driver of the given priority. */
function ranked(broker: Broker, name: string, priority: number, bundles: Record<string, number>[], wait: 'all' | 'any' = 'all'): Promise<Peer> {
  return driver(broker, name, bundles, wait, TOKEN, priority);
}

/** Bundle indices lent to a driver so far, and on which hosts. */
function lent(driver: Peer): { hostId: string; bundles: number[]; resources: Record<string, number> }[] {
  return driver.of('granted').flatMap((message) => message.nodes.map(({ hostId, bundles, resources }) => ({ hostId, bundles, resources })));
}

function endSession(hostPeer: Peer, session: OpenSessionMessage, error?: string): void {
  hostPeer.connection.send({ t: 'session-ended', sessionId: session.sessionId, ...(error ? { error } : {}) });
}

describe('broker', () => {
  let broker: Broker | undefined;
  const peers: Peer[] = [];
  const start = async (options: { backfillWindowMs?: number; hostGraceMs?: number; maxShare?: number; peerTimeoutMs?: number; preemptGraceMs?: number } = {}) => (broker = await Broker.start({ host: '127.0.0.1', port: 0, token: TOKEN, ...options }));
  const track = async (made: Promise<Peer>) => {
    const made_ = await made;
    peers.push(made_);
    return made_;
  };

  afterEach(async () => {
    for (const one of peers.splice(0)) one.connection.close();
    await broker?.close();
    broker = undefined;
  });

  it('lends a gang whole, packing bundles onto the hosts that fit them tightest', async () => {
    const b = await start();
    const gpuHost = await track(host(b, 'gpu-host', { CPU: 8 }, [0, 1, 2, 3]));
    const cpuHost = await track(host(b, 'cpu-host', { CPU: 4 }));
    const job = await track(driver(b, 'job', [{ CPU: 2 }, { CPU: 1, GPU: 2 }, { CPU: 1 }]));
    await until(() => job.of('granted').length > 0, 'a grant');
    // CPU-only bundles go where no GPU sits idle; the GPU bundle takes devices by index.
    expect(lent(job).sort((x, y) => x.hostId.localeCompare(y.hostId))).toEqual([
      { hostId: 'cpu-host', bundles: [0, 2], resources: { CPU: 3 } },
      { hostId: 'gpu-host', bundles: [1], resources: { CPU: 1, GPU: 2 } },
    ]);
    await until(() => gpuHost.of('open-session').length === 1 && cpuHost.of('open-session').length === 1, 'sessions to open');
    const session = gpuHost.of('open-session')[0];
    expect(session).toMatchObject({ gpus: [0, 1], resources: { CPU: 1 }, driver: { host: '127.0.0.1', port: 4000, token: 'job-secret' } });
    const status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.hosts.find((one) => one.hostId === 'gpu-host')).toMatchObject({ free: { CPU: 7, GPU: 2 }, sessions: 1 });
    expect(status.drivers).toEqual([expect.objectContaining({ name: 'job', bundles: 3, granted: 3, nodes: expect.any(Array) })]);
  });

  it('lends a gang nothing until all of it fits, and gives slices back only once their sessions end', async () => {
    const b = await start();
    const only = await track(host(b, 'only', { CPU: 4 }));
    const first = await track(driver(b, 'first', [{ CPU: 3 }]));
    await until(() => only.of('open-session').length === 1, 'the first session');
    const second = await track(driver(b, 'second', [{ CPU: 1 }, { CPU: 2 }]));
    // One CPU is free: the gang's first bundle would fit, yet nothing is lent.
    await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(second.of('granted')).toEqual([]);
    first.connection.close();
    await until(() => only.of('close-session').length === 1, 'the broker to close the first session');
    // Until the host says its workers are dead, the slice is still taken.
    expect((await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN })).hosts[0].free).toEqual({ CPU: 1 });
    expect(second.of('granted')).toEqual([]);
    endSession(only, only.of('open-session')[0]);
    await until(() => second.of('granted').length === 1, 'the gang to be lent');
    expect(lent(second)).toEqual([{ hostId: 'only', bundles: [0, 1], resources: { CPU: 3 } }]);
  });

  it('shares what frees among drivers that take what fits, smallest share first', async () => {
    const b = await start();
    const only = await track(host(b, 'only', { CPU: 4 }));
    const hog = await track(driver(b, 'hog', [{ CPU: 4 }]));
    await until(() => only.of('open-session').length === 1, 'the hog to be lent');
    const small = await track(driver(b, 'small', [{ CPU: 1 }, { CPU: 1 }], 'any'));
    const large = await track(driver(b, 'large', [{ CPU: 1 }, { CPU: 1 }, { CPU: 1 }, { CPU: 1 }], 'any'));
    hog.connection.close();
    await until(() => only.of('close-session').length === 1, 'the hog to leave');
    endSession(only, only.of('open-session')[0]);
    await until(() => small.of('granted').length + large.of('granted').length >= 2, 'both to be lent');
    // Four CPUs free, six asked: each gets two (the small one all it asked, the large one half).
    expect(lent(small).flatMap((grant) => grant.bundles).length).toBe(2);
    expect(lent(large).flatMap((grant) => grant.bundles).length).toBe(2);
  });

  it('lets later requests fit around a waiting gang, until the gang has waited past the window', async () => {
    const b = await start({ backfillWindowMs: 0 });
    const only = await track(host(b, 'only', { CPU: 4 }));
    const holder = await track(driver(b, 'holder', [{ CPU: 2 }]));
    await until(() => only.of('open-session').length === 1, 'the holder to be lent');
    const big = await track(driver(b, 'big', [{ CPU: 4 }]));
    // The big gang has waited past a window of 0 ms: a later small one may not jump it.
    const later = await track(driver(b, 'later', [{ CPU: 1 }]));
    await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(later.of('granted')).toEqual([]);
    expect(big.of('granted')).toEqual([]);
    holder.connection.close();
    await until(() => only.of('close-session').length === 1, 'the holder to leave');
    endSession(only, only.of('open-session')[0]);
    await until(() => big.of('granted').length === 1, 'the big gang');
    expect(later.of('granted')).toEqual([]);
  });

  it('backfills within the window', async () => {
    const b = await start({ backfillWindowMs: 60_000 });
    const only = await track(host(b, 'only', { CPU: 4 }));
    await track(driver(b, 'holder', [{ CPU: 2 }]));
    await until(() => only.of('open-session').length === 1, 'the holder to be lent');
    const big = await track(driver(b, 'big', [{ CPU: 4 }]));
    const later = await track(driver(b, 'later', [{ CPU: 1 }]));
    await until(() => later.of('granted').length === 1, 'the later one to fit around the gang');
    expect(big.of('granted')).toEqual([]);
  });

  it("asks again for a lost node's bundles when its driver says so, and takes back a host that returns with its sessions", async () => {
    const b = await start();
    const first = await track(host(b, 'first', { CPU: 2 }));
    const second = await track(host(b, 'second', { CPU: 2 }));
    const job = await track(driver(b, 'job', [{ CPU: 2 }]));
    await until(() => job.of('granted').length === 1, 'a grant');
    const [lost, kept] = lent(job)[0].hostId === 'first' ? [first, second] : [second, first];
    const lostId = lent(job)[0].hostId;
    const session = lost.of('open-session')[0];
    // The host's link to the broker drops, but its session may live on: nothing is lent again yet.
    lost.connection.close();
    while ((await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN })).hosts.length !== 1) await new Promise((resolve) => setTimeout(resolve, 10));
    expect(job.of('granted')).toHaveLength(1);
    // It comes back still running the session: the slice stays the driver's, lent once.
    const back = await track(peer(b, {
      t: 'host-hello', token: TOKEN, protocol: AGENT_PROTOCOL, hostId: lostId, hostname: lostId, resources: { CPU: 2 }, gpus: [],
      sessions: [{ sessionId: session.sessionId, nodeId: session.nodeId, resources: session.resources, gpus: [] }],
    }));
    const status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.hosts.find((one) => one.hostId === lostId)).toMatchObject({ free: { CPU: 0 }, sessions: 1 });
    expect(status.drivers[0].nodes).toEqual([session.nodeId]);
    // The driver loses the node: its bundle is lent again, and the host is asked to end the session.
    job.connection.send({ t: 'node-left', nodeId: session.nodeId });
    await until(() => job.of('granted').length === 2 && back.of('close-session').length === 1, 'the bundle to be lent again');
    expect(lent(job)[1].hostId).not.toBe(lostId);
    expect(kept.of('open-session')).toHaveLength(1);
    // A session that never began is not asked for again.
    endSession(kept, kept.of('open-session')[0], 'could not reach the driver');
    await until(() => job.of('session-lost').length === 1, 'the failed session');
    expect(job.of('session-lost')[0]).toMatchObject({ requeued: false, reason: 'could not reach the driver' });
    expect(job.of('granted')).toHaveLength(2);
    const greedy = await track(driver(b, 'greedy', [{ CPU: 3 }]));
    await until(() => greedy.of('unsatisfiable').length === 1, 'the refusal');
    expect(greedy.of('unsatisfiable')[0].reason).toMatch(/bundle 0 \{ CPU: 3 \} fits no host/);
  });

  it("lends elsewhere, after a grace, what a vanished host was lent that never joined; joined nodes stay the driver's to report", async () => {
    const b = await start({ hostGraceMs: 50 });
    const first = await track(host(b, 'first', { CPU: 2 }));
    const joinedJob = await track(driver(b, 'joined', [{ CPU: 1 }]));
    const waitingJob = await track(driver(b, 'waiting', [{ CPU: 1 }]));
    await until(() => first.of('open-session').length === 2, 'both jobs on the only host');
    const [joined, waiting] = first.of('open-session');
    joinedJob.connection.send({ t: 'node-joined', nodeId: joined.nodeId });
    await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    first.connection.close();
    await until(() => waitingJob.of('session-lost').length === 1, 'the unjoined session to be given up');
    expect(waitingJob.of('session-lost')[0]).toMatchObject({ nodeId: waiting.nodeId, requeued: true, reason: expect.stringContaining('before the node joined') });
    const second = await track(host(b, 'second', { CPU: 2 }));
    await until(() => second.of('open-session').length === 1, 'the bundle on the new host');
    // One session only: the joined node is still its driver's.
    expect(second.of('open-session')[0].driver.token).toBe('waiting-secret');
    expect(joinedJob.of('session-lost')).toEqual([]);
    expect((await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN })).drivers.map((one) => one.granted)).toEqual([1, 1]);
  });

  it('after a restart, takes back the nodes drivers still hold and the sessions hosts still run, lending neither twice', async () => {
    const first = await start();
    const port = first.port;
    const hostPeer = await track(host(first, 'only', { CPU: 2 }));
    const job = await track(driver(first, 'job', [{ CPU: 1 }, { CPU: 1 }], 'any'));
    await until(() => hostPeer.of('open-session').length === 1, 'a session');
    const session = hostPeer.of('open-session')[0];
    await first.close();
    await until(() => hostPeer.closed && job.closed, 'the connections to close');
    const second = (broker = await Broker.start({ host: '127.0.0.1', port, token: TOKEN }));
    // The driver comes back first, holding one node of its two bundles: that node is claimed.
    const back = await track(peer(second, {
      t: 'driver-hello', token: TOKEN, protocol: AGENT_PROTOCOL, name: 'job', bundles: [{ CPU: 1 }, { CPU: 1 }], wait: 'any',
      listen: { port: 4000, token: 'job-secret' },
      resume: { nodes: [{ nodeId: session.nodeId, hostId: 'only', bundles: [0], resources: { CPU: 1 } }], waitedMs: 5000 },
    }));
    let status = await brokerStatus(`127.0.0.1:${port}`, { token: TOKEN });
    expect(status.drivers[0]).toMatchObject({ granted: 1, nodes: [session.nodeId] });
    // It keeps its place in the queue: it asked 5 s ago, not now.
    expect(status.drivers[0].waitingMs).toBeGreaterThanOrEqual(5000);
    // Its host registers again with the session: the driver's again, its slice taken.
    const hostBack = await track(peer(second, {
      t: 'host-hello', token: TOKEN, protocol: AGENT_PROTOCOL, hostId: 'only', hostname: 'only', resources: { CPU: 1 + 1 }, gpus: [],
      sessions: [{ sessionId: session.sessionId, nodeId: session.nodeId, resources: { CPU: 1 }, gpus: [] }],
    }));
    // The bundle it did not hold is lent now, in a new session: one CPU, not two.
    await until(() => hostBack.of('open-session').length === 1, 'the other bundle');
    expect(hostBack.of('open-session')[0]).toMatchObject({ resources: { CPU: 1 } });
    expect(hostBack.of('open-session')[0].nodeId).not.toBe(session.nodeId);
    status = await brokerStatus(`127.0.0.1:${port}`, { token: TOKEN });
    expect(status.hosts[0]).toMatchObject({ free: { CPU: 0 }, sessions: 2 });
    expect(status.drivers[0].nodes).toContain(session.nodeId);
    // The driver loses the resumed node: the host is asked to end it, and the bundle waits again.
    back.connection.send({ t: 'node-left', nodeId: session.nodeId });
    await until(() => hostBack.of('close-session').some((message) => message.sessionId === session.sessionId), 'the session to be closed');
  });

  it('holds each job within maxShare of the cluster, and refuses a gang that asks for more', async () => {
    const b = await start({ maxShare: 0.5 });
    const gpus = await track(host(b, 'gpus', { CPU: 8 }, [0, 1, 2, 3]));
    const greedy = await track(driver(b, 'greedy', [{ GPU: 1 }, { GPU: 1 }, { GPU: 1 }, { GPU: 1 }], 'any'));
    await until(() => greedy.of('granted').length === 1, 'a grant');
    expect(lent(greedy).flatMap((grant) => grant.bundles)).toHaveLength(2);
    const gang = await track(driver(b, 'gang', [{ GPU: 3 }]));
    await until(() => gang.of('unsatisfiable').length === 1, 'the refusal');
    expect(gang.of('unsatisfiable')[0].reason).toBe('it asks for GPU: 3, more than the 2 a job may hold (maxShare 0.5 of 4)');
    const other = await track(driver(b, 'other', [{ GPU: 1 }, { GPU: 1 }]));
    await until(() => other.of('granted').length === 1, 'the other half');
    expect((await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN })).hosts[0].free).toMatchObject({ GPU: 0 });
    expect(gpus.of('open-session')).toHaveLength(2);
    expect((await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN })).maxShare).toBe(0.5);
    await expect(Broker.start({ host: '127.0.0.1', port: 0, token: TOKEN, maxShare: 0 })).rejects.toThrow(/maxShare is a fraction/);
  });

  it('registers a host agent, which stops cleanly, and which a wrong token stops with a ClusterError', async () => {
    const b = await start();
    const address = `127.0.0.1:${b.port}`;
    const agent = new HostAgent({ broker: address, token: TOKEN, id: 'in-process', numCpus: 3, gpuDevices: [1, 3] });
    while ((await brokerStatus(address, { token: TOKEN })).hosts.length === 0) await new Promise((resolve) => setTimeout(resolve, 10));
    expect((await brokerStatus(address, { token: TOKEN })).hosts[0]).toMatchObject({ hostId: 'in-process', total: { CPU: 3, GPU: 2 } });
    await agent.close();
    await agent.done;
    while ((await brokerStatus(address, { token: TOKEN })).hosts.length > 0) await new Promise((resolve) => setTimeout(resolve, 10));
    const refused = new HostAgent({ broker: address, token: 'nope', id: 'refused', numCpus: 1 });
    const error = await rejection(refused.done);
    expect(error).toBeInstanceOf(ClusterError);
    expect(error.code).toBe('ERR_WRONG_TOKEN');
    await refused.close();
    expect(() => new HostAgent({ broker: 'no-port', token: TOKEN })).toThrow(/host:port/);
    expect(() => new HostAgent({ broker: address, token: TOKEN, gpuDevices: [-1] })).toThrow(/device indices/);
  });

  it("admits drivers by their user's token and holds each user's jobs together within its quota", async () => {
    const b = (broker = await Broker.start({
      host: '127.0.0.1', port: 0, token: TOKEN,
      users: { alice: { token: 'alice-secret', quota: { GPU: 2 } }, bob: { token: 'bob-secret' } },
    }));
    const gpus = await track(host(b, 'gpus', { CPU: 8 }, [0, 1, 2, 3]));
    const first = await track(driver(b, 'first', [{ GPU: 1 }], 'all', 'alice-secret'));
    await until(() => first.of('granted').length === 1, "alice's first job");
    // Alice holds one GPU of two: a second job asking for two waits (alone it would fit).
    const second = await track(driver(b, 'second', [{ GPU: 2 }], 'all', 'alice-secret'));
    const bobs = await track(driver(b, 'bobs', [{ GPU: 1 }, { GPU: 1 }], 'any', 'bob-secret'));
    await until(() => lent(bobs).flatMap((grant) => grant.bundles).length === 2, "bob's job");
    expect(second.of('granted')).toEqual([]);
    expect(second.of('unsatisfiable')).toEqual([]);
    const status = await brokerStatus(`127.0.0.1:${b.port}`, { token: 'alice-secret' });
    expect(status.drivers.map((one) => [one.name, one.user, one.granted])).toEqual([['first', 'alice', 1], ['second', 'alice', 0], ['bobs', 'bob', 2]]);
    first.connection.close();
    await until(() => gpus.of('close-session').length === 1, 'the first job to end');
    endSession(gpus, gpus.of('open-session')[0]);
    await until(() => second.of('granted').length === 1, "alice's second job");
    const third = await track(driver(b, 'third', [{ GPU: 3 }], 'all', 'alice-secret'));
    await until(() => third.of('unsatisfiable').length === 1, 'the refusal');
    expect(third.of('unsatisfiable')[0].reason).toBe("it asks for GPU: 3, more than user alice's quota of 2");
    // The cluster's token is for hosts: drivers show a user's.
    const anonymous = await track(driver(b, 'anonymous', [{ CPU: 1 }]));
    expect(anonymous.of('broker-refused')[0]).toMatchObject({ code: 'ERR_WRONG_TOKEN', reason: expect.stringContaining("user's token") });
    const stranger = await track(peer(b, { t: 'host-hello', token: 'alice-secret', protocol: AGENT_PROTOCOL, hostId: 'h', hostname: 'h', resources: {}, gpus: [], sessions: [] }));
    expect(stranger.of('broker-refused')[0]).toMatchObject({ code: 'ERR_WRONG_TOKEN' });
    await expect(Broker.start({ host: '127.0.0.1', port: 0, token: TOKEN, users: { eve: { token: TOKEN } } })).rejects.toThrow(/a token of its own/);
  });

  it('takes back a node a driver gives back, lends it to others, and lends again what the driver asks for again', async () => {
    const b = await start();
    const only = await track(host(b, 'only', { CPU: 2 }));
    const job = await track(driver(b, 'job', [{ CPU: 2 }]));
    await until(() => only.of('open-session').length === 1, 'a session');
    const session = only.of('open-session')[0];
    const waiting = await track(driver(b, 'waiting', [{ CPU: 1 }]));
    job.connection.send({ t: 'release-node', nodeId: session.nodeId });
    await until(() => only.of('close-session').length === 1, 'the host to be told');
    endSession(only, session);
    // Given back, not lost: no session-lost, not asked for again; the next job gets the slice.
    await until(() => waiting.of('granted').length === 1, 'the waiting job');
    let status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.drivers.find((one) => one.name === 'job')).toMatchObject({ granted: 0, released: 1, nodes: [] });
    expect(job.of('session-lost')).toEqual([]);
    job.connection.send({ t: 'request-again', bundles: [0] });
    waiting.connection.close();
    await until(() => only.of('close-session').length === 2, 'the waiting job to leave');
    endSession(only, only.of('open-session')[1]);
    await until(() => job.of('granted').length === 2, 'the bundle lent again');
    status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.drivers[0]).toMatchObject({ name: 'job', granted: 1, released: 0 });
  });

  it('drops a driver that falls silent (a hung process holding its connection open), freeing its slices', async () => {
    const b = await start({ peerTimeoutMs: 1000 });
    const only = await track(host(b, 'only', { CPU: 2 }));
    const hung = await track(driver(b, 'hung', [{ CPU: 2 }]));
    await until(() => only.of('open-session').length === 1, 'a session');
    // The host says it is alive; the driver says nothing more.
    const alive = setInterval(() => only.connection.send({ t: 'alive' }), 50);
    try {
      await until(() => only.of('close-session').length === 1, 'the silent driver to be dropped');
      endSession(only, only.of('open-session')[0]);
      let status;
      do status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
      while (status.hosts[0].free.CPU !== 2);
      expect(status.drivers).toEqual([]);
      expect(status.hosts).toHaveLength(1);
      expect(hung.closed).toBe(true);
    } finally {
      clearInterval(alive);
    }
  });

  it("gives up a lent slice whose driver takes the connection and never welcomes it", async () => {
    const sockets: Socket[] = [];
    const silent = createServer((socket) => sockets.push(socket.on('error', () => undefined)));
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', () => resolve()));
    try {
      const port = (silent.address() as { port: number }).port;
      const agent = new NodeAgent({ head: `127.0.0.1:${port}`, token: 'session-token', id: 'slice', numCpus: 1, once: true, transferPort: null, connectTimeoutMs: 300, retryMs: 50 });
      const error = await rejection(agent.done);
      expect(error).toBeInstanceOf(ClusterError);
      expect(error.code).toBe('ERR_HEAD_UNREACHABLE');
      expect(sockets.length).toBeGreaterThan(0);
      await agent.close();
    } finally {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => silent.close(resolve));
    }
  });

  it('lends more bundles a driver asks for after init, and refuses ones no host can hold', async () => {
    const b = await start();
    const only = await track(host(b, 'only', { CPU: 4 }));
    const job = await track(driver(b, 'job', [{ CPU: 1 }]));
    await until(() => job.of('granted').length === 1, 'the first grant');
    job.connection.send({ t: 'request-more', bundles: [{ CPU: 2 }] });
    await until(() => job.of('granted').length === 2, 'the second grant');
    expect(lent(job)[1]).toMatchObject({ hostId: 'only', bundles: [1], resources: { CPU: 2 } });
    expect(only.of('open-session')).toHaveLength(2);
    job.connection.send({ t: 'request-more', bundles: [{ CPU: 5 }] });
    await until(() => job.of('unsatisfiable').length === 1, 'the refusal');
    expect(job.of('unsatisfiable')[0].reason).toMatch(/bundle 2 \{ CPU: 5 \} fits no host/);
  });

  it('lends to higher priorities first, whatever the order they asked in', async () => {
    const b = await start();
    const only = await track(host(b, 'only', { CPU: 4 }));
    // Of the highest priority, so nobody takes its slice back.
    const holder = await track(ranked(b, 'holder', 10, [{ CPU: 4 }]));
    await until(() => only.of('open-session').length === 1, 'the holder');
    const low = await track(ranked(b, 'low', -1, [{ CPU: 3 }]));
    const plain = await track(driver(b, 'plain', [{ CPU: 2 }]));
    const high = await track(ranked(b, 'high', 2, [{ CPU: 2 }]));
    holder.connection.close();
    await until(() => only.of('close-session').length === 1, 'the holder to leave');
    endSession(only, only.of('open-session')[0]);
    await until(() => high.of('granted').length === 1 && plain.of('granted').length === 1, 'the two higher jobs');
    expect(low.of('granted')).toEqual([]);
    const status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.drivers.map((one) => [one.name, one.priority, one.granted])).toEqual([['low', -1, 0], ['plain', 0, 1], ['high', 2, 1]]);
  });

  it('takes back slices of lower priority for a job that does not fit, after their grace or once given back', async () => {
    const b = await start({ preemptGraceMs: 300 });
    const gpus = await track(host(b, 'gpus', { CPU: 8 }, [0, 1, 2, 3]));
    const older = await track(driver(b, 'older', [{ GPU: 2 }]));
    await until(() => gpus.of('open-session').length === 1, 'the older job');
    const newer = await track(driver(b, 'newer', [{ GPU: 1 }]));
    await until(() => gpus.of('open-session').length === 2, 'the newer job');
    // Equal priority never preempts: a third job of priority 0 waits.
    const equal = await track(driver(b, 'equal', [{ GPU: 2 }]));
    await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(older.of('preempt').concat(newer.of('preempt'))).toEqual([]);
    equal.connection.close();
    // A job of priority 5 asking two GPUs (one is free) takes the most recently lent slice, and only that one.
    const urgent = await track(ranked(b, 'urgent', 5, [{ GPU: 2 }]));
    await until(() => newer.of('preempt').length === 1, 'the newer job to be told');
    expect(newer.of('preempt')[0]).toMatchObject({ nodeId: gpus.of('open-session')[1].nodeId, graceMs: 300, reason: expect.stringContaining('urgent') });
    expect(older.of('preempt')).toEqual([]);
    // The free GPU is kept for the urgent job: a later job of priority 0 asking one GPU waits.
    const later = await track(driver(b, 'later', [{ GPU: 1 }], 'any'));
    let status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.drivers.find((one) => one.name === 'newer')).toMatchObject({ granted: 0, preempting: 1 });
    // The broker's totals (its metrics): the two slices lent so far, one taken back.
    expect(b.status().totals).toEqual({ lent: 2, preempted: 1 });
    // The grace runs out: the host is told to end the session; once ended, urgent gets the GPUs.
    await until(() => gpus.of('close-session').length === 1, 'the grace to run out');
    expect(urgent.of('granted')).toEqual([]);
    endSession(gpus, gpus.of('open-session')[1]);
    await until(() => urgent.of('granted').length === 1, 'the urgent job');
    expect(lent(urgent)[0].resources).toEqual({ GPU: 2 });
    // A preempted node is not reported lost: the job was told already, and its bundle waits.
    expect(newer.of('session-lost')).toEqual([]);
    expect(later.of('granted')).toEqual([]);
    status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.drivers.find((one) => one.name === 'newer')).toMatchObject({ granted: 0, preempting: 0, waitingMs: expect.any(Number) });
    expect(status.hosts[0].free).toEqual({ CPU: 8, GPU: 0 });
    // A job given its node back before the grace: ended at once.
    const top = await track(ranked(b, 'top', 9, [{ GPU: 2 }]));
    await until(() => older.of('preempt').length === 1, 'the older job to be told');
    older.connection.send({ t: 'release-node', nodeId: older.of('preempt')[0].nodeId });
    await until(() => gpus.of('close-session').length === 2, 'the session given back to end');
    endSession(gpus, gpus.of('open-session')[0]);
    await until(() => top.of('granted').length === 1, 'the top job');
    // Lower priorities never preempt higher ones: newer and later wait for the others to end.
    expect(urgent.of('preempt').concat(top.of('preempt'))).toEqual([]);
  });

  it('preempts the lowest priority first, and a gang takes back across hosts all it needs at once', async () => {
    const b = await start({ preemptGraceMs: 0 });
    const first = await track(host(b, 'first', { CPU: 2 }));
    const second = await track(host(b, 'second', { CPU: 2 }));
    const background = await track(ranked(b, 'background', -5, [{ CPU: 2 }]));
    await until(() => first.of('open-session').length + second.of('open-session').length === 1, 'the background job');
    const normal = await track(driver(b, 'normal', [{ CPU: 2 }]));
    await until(() => first.of('open-session').length + second.of('open-session').length === 2, 'the normal job');
    // One host's worth: the background job's slice goes, not the normal one's.
    const one = await track(ranked(b, 'one', 1, [{ CPU: 2 }]));
    await until(() => background.of('preempt').length === 1, 'the background job to be told');
    expect(normal.of('preempt')).toEqual([]);
    const hostOf = (nodeId: string) => (nodeId.startsWith('first/') ? first : second);
    const backgroundNode = background.of('preempt')[0].nodeId;
    // No grace: the host is told at once.
    await until(() => hostOf(backgroundNode).of('close-session').length === 1, 'the background session to end');
    endSession(hostOf(backgroundNode), hostOf(backgroundNode).of('open-session')[0]);
    await until(() => one.of('granted').length === 1, 'the job of priority 1');
    // A gang of priority 3 needing both hosts takes both slices back (the normal job's and one's).
    const gang = await track(ranked(b, 'gang', 3, [{ CPU: 2 }, { CPU: 2 }]));
    await until(() => normal.of('preempt').length === 1 && one.of('preempt').length === 1, 'both slices to be taken back');
    for (const hostPeer of [first, second]) {
      await until(() => hostPeer.of('close-session').length === hostPeer.of('open-session').length, 'the sessions to be ended');
      for (const session of hostPeer.of('open-session').slice(-1)) endSession(hostPeer, session);
    }
    await until(() => gang.of('granted').length === 1, 'the gang');
    expect(lent(gang).map((grant) => grant.hostId).sort()).toEqual(['first', 'second']);
    // A gang that no preemption could fit preempts nothing.
    const lower = await track(ranked(b, 'lower', 2, [{ CPU: 2 }]));
    const status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.drivers.find((job) => job.name === 'gang')).toMatchObject({ granted: 2, preempting: 0 });
    expect(gang.of('preempt')).toEqual([]);
    expect(lower.of('granted')).toEqual([]);
  });

  it("takes back what pools borrowed for another job's own request at the same priority, never for another pool's", async () => {
    const b = await start({ preemptGraceMs: 0 });
    const only = await track(host(b, 'only', { CPU: 4 }));
    const lender = await track(driver(b, 'lender', [{ CPU: 1 }]));
    await until(() => lender.of('granted').length === 1, 'the first job');
    // Its pool borrows the rest: lent in a session of its own.
    lender.connection.send({ t: 'request-more', bundles: [{ CPU: 1 }, { CPU: 1 }, { CPU: 1 }], elastic: true });
    await until(() => lender.of('granted').length === 2, 'the borrowed room');
    expect(only.of('open-session').map((session) => session.resources)).toEqual([{ CPU: 1 }, { CPU: 3 }]);
    expect((await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN })).drivers[0]).toMatchObject({ bundles: 4, granted: 4, borrowed: 3 });
    // A job of the same priority asking for its own two CPUs takes the borrowed slice back, not the job's own.
    const second = await track(driver(b, 'second', [{ CPU: 2 }]));
    await until(() => lender.of('preempt').length === 1, 'the borrowed slice to be taken back');
    expect(lender.of('preempt')[0].nodeId).toBe(only.of('open-session')[1].nodeId);
    await until(() => only.of('close-session').length === 1, 'its session to be ended');
    endSession(only, only.of('open-session')[1]);
    await until(() => second.of('granted').length === 1, 'the second job');
    // What the pool borrowed is not asked again: the job holds what it asked for itself.
    let status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.drivers.find((one) => one.name === 'lender')).toMatchObject({ bundles: 1, granted: 1 });
    // A pool's ask never takes back: the second job's pool waits for room rather than reclaim.
    second.connection.send({ t: 'request-more', bundles: [{ CPU: 2 }], elastic: true });
    do status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    while (status.drivers.find((one) => one.name === 'second')!.bundles !== 2);
    expect(lender.of('preempt')).toHaveLength(1);
    expect(second.of('granted')).toHaveLength(1);
  });

  it('after a restart, ends the nodes a driver was giving back when they were taken back, whichever comes back first', async () => {
    const b = await start();
    const resumed = (hostId: string, sessions: { sessionId: string; nodeId: string }[]) =>
      peer(b, { t: 'host-hello', token: TOKEN, protocol: AGENT_PROTOCOL, hostId, hostname: hostId, resources: { CPU: 4 }, gpus: [], sessions: sessions.map((one) => ({ ...one, resources: { CPU: 1 }, gpus: [] })) });
    // The host first: its session waits unclaimed until the driver says it was taken back.
    const first = await track(resumed('h', [{ sessionId: 's1-old', nodeId: 'h/s1-old' }]));
    const job = await track(peer(b, {
      t: 'driver-hello', token: TOKEN, protocol: AGENT_PROTOCOL, name: 'job', bundles: [{ CPU: 1 }, { CPU: 1 }], wait: 'all', listen: { port: 4000, token: 'job-secret' },
      resume: { nodes: [], waitedMs: 10, takenBack: ['h/s1-old', 'g/s2-old'] },
    }));
    await until(() => first.of('close-session').length === 1, 'the unclaimed session to be ended');
    expect(first.of('close-session')[0].sessionId).toBe('s1-old');
    // The driver first: the host's session ends as it registers again.
    const again = await track(resumed('g', [{ sessionId: 's2-old', nodeId: 'g/s2-old' }]));
    await until(() => again.of('close-session').length === 1, 'the session to be ended on registering');
    expect(again.of('close-session')[0].sessionId).toBe('s2-old');
    expect(job.of('broker-refused')).toEqual([]);
  });

  it("caps each user's priority, and refuses one that is not an integer", async () => {
    const b = (broker = await Broker.start({
      host: '127.0.0.1', port: 0, token: TOKEN,
      users: { ops: { token: 'ops-secret-1', maxPriority: 10 }, intern: { token: 'intern-secret' } },
    }));
    await track(host(b, 'h', { CPU: 2 }));
    const ops = await track(driver(b, 'ops', [{ CPU: 1 }], 'all', 'ops-secret-1', 10));
    expect(ops.of('broker-welcome')).toHaveLength(1);
    const intern = await track(driver(b, 'intern', [{ CPU: 1 }], 'all', 'intern-secret', 1));
    expect(intern.of('broker-refused')[0]).toMatchObject({ code: 'ERR_PRIORITY', reason: 'user intern may ask for priority 0 at most, not 1' });
    const odd = await track(driver(b, 'odd', [{ CPU: 1 }], 'all', 'ops-secret-1', 1.5));
    expect(odd.of('broker-refused')[0]).toMatchObject({ code: 'ERR_INVALID_ARGUMENT', reason: 'priority is an integer, got 1.5' });
    await expect(Broker.start({ host: '127.0.0.1', port: 0, token: TOKEN, preemptGraceMs: -1 })).rejects.toThrow(/preemptGraceMs/);
    await expect(Broker.start({ host: '127.0.0.1', port: 0, token: TOKEN, users: { x: { token: 'x-secret-xx', maxPriority: 0.5 } } })).rejects.toThrow(/maxPriority is an integer/);
  });

  it('drops bundles a driver withdraws, waiting or given back, as if never asked', async () => {
    const b = await start();
    const only = await track(host(b, 'only', { CPU: 2 }));
    const job = await track(driver(b, 'job', [{ CPU: 1 }]));
    await until(() => only.of('open-session').length === 1, 'the job');
    const other = await track(driver(b, 'other', [{ CPU: 1 }]));
    await until(() => other.of('granted').length === 1, 'the other job');
    // A pool's extra ask waits for room, and is withdrawn before any frees: never lent.
    job.connection.send({ t: 'request-more', bundles: [{ CPU: 1 }, { CPU: 1 }] });
    job.connection.send({ t: 'withdraw', bundles: [1] });
    // Messages on the job's connection and a status request on another are not ordered: poll.
    let status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    while (status.drivers.find((one) => one.name === 'job')!.bundles !== 2) status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    expect(status.drivers.find((one) => one.name === 'job')).toMatchObject({ bundles: 2, granted: 1 });
    other.connection.close();
    await until(() => only.of('close-session').length === 1, 'the other job to leave');
    endSession(only, only.of('open-session')[1]);
    await until(() => job.of('granted').length === 2, 'the bundle still asked');
    expect(lent(job).map((grant) => grant.bundles)).toEqual([[0], [2]]);
    // A node given back with withdraw: its bundle is neither released nor asked for again.
    job.connection.send({ t: 'release-node', nodeId: job.of('granted')[1].nodes[0].nodeId, withdraw: true });
    job.connection.send({ t: 'request-again', bundles: [2] });
    await until(() => only.of('close-session').length === 2, 'the node given back to end');
    endSession(only, only.of('open-session')[2]);
    do status = await brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN });
    while (status.hosts[0].sessions !== 1);
    expect(status.drivers[0]).toMatchObject({ name: 'job', bundles: 1, granted: 1, released: 0 });
    expect(job.of('granted')).toHaveLength(2);
  });

  it('refuses wrong tokens, other versions, malformed requests and duplicate hosts, saying why', async () => {
    const b = await start();
    await track(host(b, 'one', { CPU: 1 }));
    const refusal = async (hello: BrokerInbound) => (await track(peer(b, hello))).of('broker-refused')[0];
    expect(await refusal({ t: 'driver-hello', token: 'nope', protocol: AGENT_PROTOCOL, name: 'x', bundles: [{ CPU: 1 }], wait: 'all', listen: { port: 1, token: 't' } }))
      .toMatchObject({ code: 'ERR_WRONG_TOKEN' });
    expect(await refusal({ t: 'status-request', token: TOKEN, protocol: AGENT_PROTOCOL + 1 })).toMatchObject({ code: 'ERR_PROTOCOL' });
    expect(await refusal({ t: 'driver-hello', token: TOKEN, protocol: AGENT_PROTOCOL, name: 'x', bundles: [{ GPU: 0.5 }], wait: 'all', listen: { port: 1, token: 't' } }))
      .toMatchObject({ code: 'ERR_INVALID_ARGUMENT', reason: expect.stringContaining('whole device') });
    expect(await refusal({ t: 'driver-hello', token: TOKEN, protocol: AGENT_PROTOCOL, name: 'x', bundles: [], wait: 'all', listen: { port: 1, token: 't' } }))
      .toMatchObject({ code: 'ERR_INVALID_ARGUMENT' });
    expect(await refusal({ t: 'host-hello', token: TOKEN, protocol: AGENT_PROTOCOL, hostId: 'one', hostname: 'h', resources: { CPU: 1 }, gpus: [], sessions: [] }))
      .toMatchObject({ code: 'ERR_DUPLICATE_HOST' });
    const error = await rejection(brokerStatus(`127.0.0.1:${b.port}`, { token: 'nope' }));
    expect(error).toBeInstanceOf(ClusterError);
    expect(error.code).toBe('ERR_WRONG_TOKEN');
    await b.close();
    const gone = await rejection(brokerStatus(`127.0.0.1:${b.port}`, { token: TOKEN }));
    expect(gone.code).toBe('ERR_BROKER_UNREACHABLE');
  });
});
