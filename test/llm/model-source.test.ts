/**
 * Checkpoints on object storage: each host copies the model's directory once into its cache
 * (concurrent loaders share one download; large files in ranges; a dead holder's lock taken
 * over; a failed download leaves nothing), and a processor runs a model from s3:// with ranks that
 * make their own copy, token for token as the reference.
 */
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { S3FileSystem, buildLLMProcessor, fromItems, init, shutdown } from '../../lib/index.js';
import { localCheckpoint } from '../../lib/llm/model-source.js';
import { hostIdentity } from '../../lib/core/host.js';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { trellisCli } from '../core/helpers.js';
import { S3TestServer } from '../data/fixtures/s3-server.js';
import { randomWeights, referenceGenerate, TINY_LLAMA, writeCheckpoint } from './fixtures/decoders.js';

const run = promisify(execFile);
const server = new S3TestServer();
let storage: S3FileSystem;
let root: string;
let localModel: string;
const weights = randomWeights(TINY_LLAMA, 23);

beforeAll(async () => {
  await server.start();
  storage = new S3FileSystem(server.clientOptions);
  root = mkdtempSync(join(tmpdir(), 'trellis-model-source-'));
  localModel = await writeCheckpoint(join(root, 'tiny-llama'), TINY_LLAMA, weights);
  server.bucket('models');
  for (const name of readdirSync(localModel)) server.put('models', `tiny-llama/${name}`, readFileSync(join(localModel, name)));
});

afterAll(async () => {
  await server.close();
  rmSync(root, { recursive: true, force: true });
});

const getsOf = (key: string) => server.requests.filter((request) => request.method === 'GET' && request.path === `models/${key}`);

describe('checkpoints on object storage', () => {
  it('copies the directory once per host, concurrent loaders sharing one download, large files in ranges', async () => {
    const cache = join(root, 'cache-a');
    server.requests.length = 0;
    const [first, second, third] = await Promise.all([
      localCheckpoint('s3://models/tiny-llama', { filesystem: storage, cacheDirectory: cache, rangeBytes: 16 << 10 }),
      localCheckpoint('s3://models/tiny-llama/', { filesystem: storage, cacheDirectory: cache, rangeBytes: 16 << 10 }),
      localCheckpoint('s3://models/tiny-llama/model.safetensors', { filesystem: storage, cacheDirectory: cache, rangeBytes: 16 << 10 }),
    ]);
    expect(second).toBe(first);
    expect(third).toBe(join(first, 'model.safetensors'));
    for (const name of readdirSync(localModel)) expect(readFileSync(join(first, name)).equals(readFileSync(join(localModel, name)))).toBe(true);
    // One download: the weights file in ranges of 16 KiB, each asked for once.
    const size = readFileSync(join(localModel, 'model.safetensors')).length;
    expect(getsOf('tiny-llama/model.safetensors')).toHaveLength(Math.ceil(size / (16 << 10)));
    expect(getsOf('tiny-llama/config.json')).toHaveLength(1);
    // The copy is kept: no request the next time, and no lock or partial directory is left.
    server.requests.length = 0;
    expect(await localCheckpoint('s3://models/tiny-llama', { filesystem: storage, cacheDirectory: cache })).toBe(first);
    expect(server.requests).toHaveLength(0);
    expect(readdirSync(cache)).toEqual([first.slice(cache.length + 1)]);
    // Local paths are left as they are.
    expect(await localCheckpoint(localModel)).toBe(localModel);
  });

  it('takes over from a dead holder, and a failed download leaves no copy and no lock', async () => {
    const cache = join(root, 'cache-b');
    const first = await localCheckpoint('s3://models/tiny-llama', { filesystem: storage, cacheDirectory: join(root, 'cache-probe') });
    const name = first.slice(join(root, 'cache-probe').length + 1);
    // A lock left by a process that is gone (pid past the kernel's maximum).
    mkdirSync(cache, { recursive: true });
    writeFileSync(join(cache, `${name}.lock`), JSON.stringify({ host: hostIdentity(), pid: 2 ** 22 + 1 }));
    expect(await localCheckpoint('s3://models/tiny-llama', { filesystem: storage, cacheDirectory: cache })).toBe(join(cache, name));

    const failing = join(root, 'cache-c');
    const flaky = new S3FileSystem({ ...server.clientOptions, maxAttempts: 1 });
    server.fail(1, 500, 'InternalError', (method, key) => method === 'GET' && key === 'tiny-llama/model.safetensors');
    await expect(localCheckpoint('s3://models/tiny-llama', { filesystem: flaky, cacheDirectory: failing })).rejects.toMatchObject({ code: 'ERR_STORAGE_UNAVAILABLE' });
    expect(readdirSync(failing)).toEqual([]);
    await expect(localCheckpoint('s3://models/none', { filesystem: storage, cacheDirectory: failing })).rejects.toMatchObject({ code: 'ERR_MODEL_DOWNLOAD', message: expect.stringContaining('nothing is stored under it') });
    expect(existsSync(join(failing, `${name}.lock`))).toBe(false);
  });

  it('trellis model pull copies a checkpoint into the cache with the environment\'s credentials, and prints where', async () => {
    const cache = join(root, 'cache-cli');
    const { stdout } = await run(process.execPath, [...trellisCli, 'model', 'pull', 's3://models/tiny-llama', '--cache-dir', cache], {
      env: { ...process.env, AWS_ACCESS_KEY_ID: server.accessKeyId, AWS_SECRET_ACCESS_KEY: server.secretAccessKey, AWS_REGION: server.region, AWS_ENDPOINT_URL_S3: server.endpoint },
    });
    const path = stdout.trim();
    expect(path.startsWith(cache)).toBe(true);
    expect(readFileSync(join(path, 'model.safetensors')).equals(readFileSync(join(localModel, 'model.safetensors')))).toBe(true);
    await expect(run(process.execPath, [...trellisCli, 'model', 'pull'], {})).rejects.toMatchObject({ code: 2 });
  });

  describe('through the cluster', () => {
    beforeAll(async () => {
      process.env.TRELLIS_MODEL_CACHE = join(root, 'cluster-cache');
      await init({ numCpus: 4 });
    });
    afterAll(async () => {
      await shutdown();
      delete process.env.TRELLIS_MODEL_CACHE;
    });

    it('a processor runs a model from s3://, its replica and ranks loading the host copy, token for token as the reference', async () => {
      const prompts = [[5, 17, 3], [42, 8], [1, 2, 3, 4]];
      const processor = buildLLMProcessor({ checkpoint: 's3://models/tiny-llama', filesystem: storage, tensorParallel: 2, maxNewTokens: 6, stopTokens: [], batchSize: 2 });
      const rows = await processor(fromItems(prompts.map((tokens, id) => ({ id, tokens })))).takeAll();
      for (const row of rows) expect(Array.from(row.generatedTokens as ArrayLike<number>)).toEqual(referenceGenerate(TINY_LLAMA, weights, prompts[row.id as number], 6));
      expect(readdirSync(join(root, 'cluster-cache')).filter((entry) => !entry.endsWith('.lock'))).toHaveLength(1);
    });
  });
});
