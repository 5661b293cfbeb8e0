/**
 * Jobs submitted to a broker (lib/core/jobs.ts): commands the broker runs on its host, their
 * state, exit codes and output, stopping them, users seeing only their own, records that outlive
 * the broker. A job whose driver joins the cluster is in shared-cluster.test.ts (it needs hosts).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Broker, jobLogs, jobStatus, listJobs, stopJob, submitJob, type JobInfo } from '../../lib/index.js';
import { rejection, scratch, until } from './helpers.js';

/** Polls an asynchronous condition (a broker call) until it holds: a hang guard only. */
async function untilAsync(condition: () => Promise<boolean>, what: string, guardMs = 30_000): Promise<void> {
  const deadline = Date.now() + guardMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

const TOKEN = 'jobs-cluster-token';
const node = process.execPath;
const scratchDir = scratch();

describe('jobs', () => {
  let broker: Broker | undefined;
  afterEach(async () => {
    await broker?.close();
    broker = undefined;
  });
  afterEach(() => scratchDir.cleanup());

  const start = async (directory: string, users?: Record<string, { token: string }>) => {
    broker = await Broker.start({ host: '127.0.0.1', port: 0, token: TOKEN, jobsDirectory: directory, ...(users ? { users } : {}) });
    return `127.0.0.1:${broker.port}`;
  };
  const ended = async (address: string, jobId: string, token = TOKEN): Promise<JobInfo> => {
    let job: JobInfo | undefined;
    await untilAsync(async () => !['running', 'stopping'].includes((job = await jobStatus(address, jobId, { token })).state), `job ${jobId} to end`);
    return job!;
  };

  it('runs a command on the broker host with the cluster in its environment, keeps its output and exit code', async () => {
    const address = await start(scratchDir.path('jobs'));
    const script = 'console.log("broker", process.env.TRELLIS_BROKER, "job", process.env.TRELLIS_JOB_ID, "extra", process.env.EXTRA); console.error("to stderr"); process.exit(3)';
    const job = await submitJob(address, { entrypoint: [node, '-e', script], env: { EXTRA: 'yes' }, name: 'exits-3' }, { token: TOKEN });
    expect(job).toMatchObject({ state: 'running', name: 'exits-3', entrypoint: [node, '-e', script] });
    expect(job.jobId).toMatch(/^job-\d{8}-[0-9a-f]{8}$/);
    const done = await ended(address, job.jobId);
    expect(done).toMatchObject({ state: 'failed', exitCode: 3 });
    const logs = await jobLogs(address, job.jobId, 0, { token: TOKEN });
    expect(logs.text).toContain(`broker ${address} job ${job.jobId} extra yes`);
    expect(logs.text).toContain('to stderr');
    expect(logs.ended).toBe(true);
    // From an offset: the rest only.
    expect((await jobLogs(address, job.jobId, logs.next, { token: TOKEN })).text).toBe('');
    const ok = await submitJob(address, { entrypoint: [node, '-e', 'process.stdout.write("fine\\u00e9")'] }, { token: TOKEN });
    expect(await ended(address, ok.jobId)).toMatchObject({ state: 'succeeded', exitCode: 0 });
    expect((await jobLogs(address, ok.jobId, 0, { token: TOKEN })).text).toBe('fine\u00e9');
    expect((await listJobs(address, { token: TOKEN })).map((listed) => listed.jobId)).toEqual([job.jobId, ok.jobId]);
  });

  it('stops a running job and everything it started; bad submissions and unknown jobs are typed errors', async () => {
    const address = await start(scratchDir.path('jobs'));
    const script = 'require("child_process").spawn(process.execPath, ["-e", "setInterval(() => {}, 1000)"], { stdio: "inherit" }); console.log("started"); setInterval(() => {}, 1000)';
    const job = await submitJob(address, { entrypoint: [node, '-e', script] }, { token: TOKEN });
    await untilAsync(async () => (await jobLogs(address, job.jobId, 0, { token: TOKEN })).text.includes('started'), 'the job to start');
    expect((await stopJob(address, job.jobId, { token: TOKEN })).state).toBe('stopping');
    const done = await ended(address, job.jobId);
    expect(done).toMatchObject({ state: 'stopped', signal: 'SIGTERM', reason: 'stopped by the cluster token' });
    // Its process group is gone: the grandchild too.
    await until(() => {
      try {
        process.kill(-done.pid!, 0);
        return false;
      } catch {
        return true;
      }
    }, 'the job\'s processes to end');

    expect((await rejection(submitJob(address, { entrypoint: [] }, { token: TOKEN }))).message).toContain('entrypoint');
    expect((await rejection(submitJob(address, { entrypoint: [node], cwd: 'relative/dir' }, { token: TOKEN }))).message).toContain('absolute directory');
    expect((await rejection(submitJob(address, { entrypoint: [node], cwd: join(scratchDir.path('none'), 'x') }, { token: TOKEN }))).code).toBe('ERR_JOB_CWD');
    expect((await rejection(jobStatus(address, 'job-nope', { token: TOKEN }))).code).toBe('ERR_JOB_NOT_FOUND');
    expect((await rejection(listJobs(address, { token: 'wrong-token' }))).code).toBe('ERR_WRONG_TOKEN');
    // A working directory is sent along, so the job runs in its copy there, not in a cwd too.
    const project = scratchDir.path('project');
    mkdirSync(project);
    expect((await rejection(submitJob(address, { entrypoint: [node], cwd: '/', runtimeEnv: { workingDir: project } }, { token: TOKEN }))).code).toBe('ERR_JOB_CWD');
    expect((await rejection(submitJob(address, { entrypoint: [node], runtimeEnv: { workingDir: join(project, 'none') } }, { token: TOKEN }))).code).toBe('ERR_RUNTIME_ENV');
    expect((await rejection(submitJob(address, { entrypoint: [node], runtimeEnv: { env: { TRELLIS_X: '1' } } }, { token: TOKEN }))).message).toContain("trellis's own");
    // A command that cannot start fails with the reason.
    const missing = await submitJob(address, { entrypoint: ['/no/such/program'] }, { token: TOKEN });
    expect(await ended(address, missing.jobId)).toMatchObject({ state: 'failed', reason: expect.stringContaining('could not start') });
  });

  it("runs a job in the broker's copy of its working directory, with its runtime environment", async () => {
    const jobs = scratchDir.path('jobs');
    const address = await start(jobs);
    const project = scratchDir.path('project');
    mkdirSync(join(project, 'node_modules/left'), { recursive: true });
    writeFileSync(join(project, 'input.txt'), 'from the laptop');
    writeFileSync(join(project, 'node_modules/left/index.js'), '');
    const script = 'console.log(JSON.stringify({ cwd: process.cwd(), input: require("fs").readFileSync("input.txt", "utf8"), greeting: process.env.GREETING, runtimeEnv: JSON.parse(process.env.TRELLIS_RUNTIME_ENV) }))';
    const job = await submitJob(address, { entrypoint: [node, '-e', script], runtimeEnv: { workingDir: project, env: { GREETING: 'hi' } } }, { token: TOKEN });
    expect(await ended(address, job.jobId)).toMatchObject({ state: 'succeeded', workingDir: { files: 1, bytes: 15 } });
    const ran = JSON.parse((await jobLogs(address, job.jobId, 0, { token: TOKEN })).text) as { cwd: string; input: string; greeting: string; runtimeEnv: unknown };
    expect(ran.cwd.startsWith(join(jobs, 'code'))).toBe(true);
    expect(job.cwd).toBe(ran.cwd);
    // The driver's init reads this: it ships the copy on to its workers' hosts.
    expect(ran).toMatchObject({ input: 'from the laptop', greeting: 'hi', runtimeEnv: { workingDir: ran.cwd, env: { GREETING: 'hi' } } });
  });

  it('with users: each submits and sees its own jobs; the cluster token sees all but submits none', async () => {
    const users = { alice: { token: 'alice-token-secret' }, bob: { token: 'bob-token-secret' } };
    const address = await start(scratchDir.path('jobs'), users);
    const job = await submitJob(address, { entrypoint: [node, '-e', 'console.log(process.env.TRELLIS_CLUSTER_TOKEN)'] }, { token: users.alice.token });
    expect(job.user).toBe('alice');
    await ended(address, job.jobId, users.alice.token);
    // Its driver would join as alice: it has alice's token.
    expect((await jobLogs(address, job.jobId, 0, { token: users.alice.token })).text.trim()).toBe(users.alice.token);
    expect(await listJobs(address, { token: users.bob.token })).toEqual([]);
    expect((await rejection(jobStatus(address, job.jobId, { token: users.bob.token }))).code).toBe('ERR_JOB_NOT_FOUND');
    expect((await rejection(stopJob(address, job.jobId, { token: users.bob.token }))).code).toBe('ERR_JOB_NOT_FOUND');
    expect((await listJobs(address, { token: TOKEN })).map((listed) => listed.user)).toEqual(['alice']);
    expect((await rejection(submitJob(address, { entrypoint: [node, '-e', ''] }, { token: TOKEN }))).code).toBe('ERR_WRONG_TOKEN');
  });

  it('a broker that closes stops its jobs; one started on the same directory lists them, and ends what a dead broker left running', async () => {
    const directory = scratchDir.path('jobs');
    let address = await start(directory);
    const running = await submitJob(address, { entrypoint: [node, '-e', 'setInterval(() => {}, 1000)'] }, { token: TOKEN });
    const finished = await submitJob(address, { entrypoint: [node, '-e', ''] }, { token: TOKEN });
    await ended(address, finished.jobId);
    await broker!.close();
    // A record left running by a broker that died (its process is gone).
    mkdirSync(directory, { recursive: true });
    writeFileSync(join(directory, 'job-20260101-deadbeef.json'), JSON.stringify({ jobId: 'job-20260101-deadbeef', name: 'orphan', entrypoint: ['x'], cwd: '/', state: 'running', pid: 2 ** 22 + 7, submittedAt: '2026-01-01T00:00:00.000Z' }));
    address = await start(directory);
    const jobs = await listJobs(address, { token: TOKEN });
    expect(Object.fromEntries(jobs.map((job) => [job.jobId, job.state]))).toEqual({ [running.jobId]: 'stopped', [finished.jobId]: 'succeeded', 'job-20260101-deadbeef': 'failed' });
    expect(jobs.find((job) => job.jobId === running.jobId)!.reason).toBe('stopped by the broker shutting down');
    expect(jobs.find((job) => job.jobId === 'job-20260101-deadbeef')!.reason).toBe('the broker stopped while it ran');
  });
});
