/**
 * A driver's working directory shipped to a node agent (runtimeEnv): the agent's workers run in
 * its host's copy and import the driver's modules from there under the driver's names, so tasks,
 * nested tasks and actors defined in the directory run on a host that never had it; the
 * variables of runtimeEnv.env reach every worker; an agent that cannot install it is not taken in.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { events, get, init, state, waitForNodes, type ActorClass, type ClusterSession, type RemoteFunction } from '../../lib/index.js';
import { trellisCli } from './helpers.js';

interface Place {
  module: string;
  cwd: string;
  data: string;
  greeting: string | null;
  node: string;
}
interface Tasks {
  describeHere: RemoteFunction<() => Place>;
  callBack: RemoteFunction<() => Promise<{ outer: Place; inner: Place }>>;
  GreeterActor: ActorClass<new () => { hello(name: string): { text: string; module: string } }>;
}

const TOKEN = 'working-dir-token';
const library = pathToFileURL(join(import.meta.dirname, '../../lib/index.ts')).href;

const TASKS = `
import { readFileSync } from 'node:fs';
import { get, remote } from '${library}';

function here() {
  return { module: import.meta.url, cwd: process.cwd(), data: readFileSync('data.txt', 'utf8').trim(), greeting: process.env.GREETING ?? null, node: process.env.TRELLIS_NODE_ID };
}
export const describeHere = remote(import.meta, function describeHere() {
  return here();
});
export const callBack = remote(import.meta, async function callBack() {
  // Submitted on the far host, by a module it loaded from its copy: named as the driver names it.
  return { outer: here(), inner: await get(describeHere.options({ resources: { near: 1 } }).remote()) };
});
class Greeter {
  hello(name: string) {
    return { text: readFileSync('data.txt', 'utf8').trim() + ' ' + name, module: import.meta.url };
  }
}
export const GreeterActor = remote(import.meta, Greeter);
`;

function startAgent(port: number, id: string, cache: string): ChildProcess {
  return spawn(process.execPath, [
    ...trellisCli, 'node', '--head', `127.0.0.1:${port}`, '--id', id, '--num-cpus', '1', '--num-gpus', '0',
    '--resources', JSON.stringify({ far: 1 }), '--object-store-memory', String(32 * 1024 * 1024), '--once', '--code-cache', cache,
  ], { env: { ...process.env, TRELLIS_CLUSTER_TOKEN: TOKEN }, stdio: ['ignore', 'inherit', 'inherit'] });
}

describe('a working directory shipped to node agents', () => {
  const scratch = mkdtempSync(join(tmpdir(), 'trellis-working-dir-'));
  const workingDir = join(scratch, 'project');
  const cache = join(scratch, 'cache');
  const agents: ChildProcess[] = [];
  const installs: Array<{ nodeId: string; path: string }> = [];
  const warnings: string[] = [];
  let session: ClusterSession;
  let tasks: Tasks;

  beforeAll(async () => {
    mkdirSync(workingDir, { recursive: true });
    writeFileSync(join(workingDir, 'package.json'), JSON.stringify({ name: 'project', type: 'module' }));
    writeFileSync(join(workingDir, 'tasks.ts'), TASKS);
    writeFileSync(join(workingDir, 'data.txt'), 'hello from the working directory\n');
    writeFileSync(join(workingDir, 'secret.env'), 'not sent');
    session = await init({
      numCpus: 1,
      resources: { near: 1 },
      prestartWorkers: 1,
      listen: { host: '127.0.0.1', port: 0, token: TOKEN },
      runtimeEnv: { workingDir, excludes: ['*.env'], env: { GREETING: 'hi' } },
    });
    events().on('working-dir-installed', (event: { nodeId: string; path: string }) => installs.push(event));
    events().on('warning', (event: { message: string }) => warnings.push(event.message));
    tasks = (await import(pathToFileURL(join(workingDir, 'tasks.ts')).href)) as Tasks;
    agents.push(startAgent(state().listening!.port, 'far', cache));
    await waitForNodes(2, { timeout: 60_000 });
  }, 90_000);

  afterAll(async () => {
    await session?.shutdown();
    for (const agent of agents) if (agent.exitCode === null) agent.kill('SIGKILL');
    rmSync(scratch, { recursive: true, force: true });
  });

  it("runs the directory's tasks and actors on a host from its copy, under the driver's names", async () => {
    expect(installs).toHaveLength(1);
    expect(state().workingDir).toMatchObject({ root: workingDir, files: 3, installing: [] });
    const copy = installs[0].path;
    expect(copy.startsWith(cache)).toBe(true);
    expect(existsSync(join(copy, 'tasks.ts'))).toBe(true);
    expect(existsSync(join(copy, 'secret.env'))).toBe(false);

    const [far, near] = await get([tasks.describeHere.options({ resources: { far: 1 } }).remote(), tasks.describeHere.options({ resources: { near: 1 } }).remote()]);
    expect(far).toEqual({ module: pathToFileURL(join(copy, 'tasks.ts')).href, cwd: copy, data: 'hello from the working directory', greeting: 'hi', node: 'far' });
    // This host's workers run in the directory itself.
    expect(near).toMatchObject({ module: pathToFileURL(join(workingDir, 'tasks.ts')).href, cwd: workingDir, greeting: 'hi', node: 'node-0' });

    const nested = await get(tasks.callBack.options({ resources: { far: 1 } }).remote());
    expect(nested.outer.cwd).toBe(copy);
    expect(nested.inner.cwd).toBe(workingDir);

    // A task's own variables over the driver's, on the far host's workers too, in its copy.
    const own = await get(tasks.describeHere.options({ resources: { far: 1 }, runtimeEnv: { env: { GREETING: 'hello' } } }).remote());
    expect(own).toMatchObject({ cwd: copy, greeting: 'hello', node: 'far' });

    const greeter = tasks.GreeterActor.options({ resources: { far: 1 } }).remote();
    const greeting = await get(greeter.hello.remote('you'));
    expect(greeting).toEqual({ text: 'hello from the working directory you', module: pathToFileURL(join(copy, 'tasks.ts')).href });
  });

  it('keeps out an agent that cannot install it, saying why', async () => {
    // A cache where no directory can be made: under a file.
    writeFileSync(join(scratch, 'a-file'), '');
    const refused = startAgent(state().listening!.port, 'no-room', join(scratch, 'a-file', 'cache'));
    agents.push(refused);
    const exited = new Promise<void>((resolve) => refused.once('exit', () => resolve()));
    await exited;
    expect(state().nodes.map((node) => node.nodeId).sort()).toEqual(['far', 'node-0']);
    expect(warnings.some((message) => /node no-room .* could not install the working directory/.test(message))).toBe(true);
    expect(readFileSync(join(installs[0].path, 'data.txt'), 'utf8')).toContain('hello');
  });
});
