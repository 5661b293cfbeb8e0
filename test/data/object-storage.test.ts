/**
 * Object storage in-process (no cluster): SigV4 against AWS's published example, the S3
 * filesystem against a signature-checking S3 server (paged listings, ranged reads, single and
 * multipart writes, copies, deletes, retries and refusals), and every file format read from and
 * written to s3:// URLs through the same sources and sinks as local paths.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { gzipSync } from 'node:zlib';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StorageError } from '../../lib/errors.js';
import { blockToRows, concatBlocks, rowsToBlock, type Block, type Row } from '../../lib/data/block.js';
import type { Datasource, ReadTask, WriteContext } from '../../lib/data/datasource.js';
import { EMPTY_PAYLOAD_HASH, sha256Hex, signRequest } from '../../lib/data/filesystem/s3-signing.js';
import { S3FileSystem } from '../../lib/data/filesystem/s3.js';
import { LocalFileSystem, fileSystemFor } from '../../lib/data/filesystem/file-system.js';
import { pack, unpack } from '../../lib/core/serialization.js';
import {
  ArrowDatasink, CsvDatasink, JsonlDatasink, ParquetDatasink, arrowSource, binarySource, csvSource, jsonlSource, parquetSource, textSource, type WrittenFile,
} from '../../lib/data/formats/index.js';
import { S3TestServer } from './fixtures/s3-server.js';

const server = new S3TestServer({ pageSize: 3 });
let storage: S3FileSystem;

beforeAll(async () => {
  await server.start();
  storage = new S3FileSystem({ ...server.clientOptions, maxAttempts: 3 });
});

afterAll(async () => {
  await server.close();
});

beforeEach(() => {
  server.buckets.clear();
  server.requests.length = 0;
  server.bucket('data');
});

async function readAll(source: Datasource, parallelism = 1): Promise<{ tasks: ReadTask[]; rows: Row[] }> {
  const tasks = await source.getReadTasks(parallelism);
  const blocks: Block[] = [];
  for (const task of tasks) for await (const output of task.read()) blocks.push(output as Block);
  return { tasks, rows: blocks.length ? blockToRows(concatBlocks(blocks)) : [] };
}

const context = (taskIndex = 0, attempt = 0, writeId = 'job1'): WriteContext => ({ taskIndex, attempt, writeId });

async function readText(storage: S3FileSystem, path: string): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of storage.readStream(path)) chunks.push(Buffer.from(chunk));
  return Buffer.concat(chunks).toString();
}

const rows: Row[] = Array.from({ length: 40 }, (_, index) => ({ id: index, name: `row ${index} ü`, score: index / 4, part: index % 2 === 0 ? 'even' : 'odd' }));

describe('SigV4', () => {
  it("signs AWS's published GET-with-range example to its published signature", () => {
    // From the Amazon S3 API reference's "Example: GET Object" (Signature Version 4, header form).
    const { signature, authorization } = signRequest(
      {
        method: 'GET',
        encodedPath: '/test.txt',
        query: '',
        headers: { host: 'examplebucket.s3.amazonaws.com', range: 'bytes=0-9', 'x-amz-content-sha256': EMPTY_PAYLOAD_HASH, 'x-amz-date': '20130524T000000Z' },
        payloadHash: EMPTY_PAYLOAD_HASH,
      },
      { accessKeyId: 'AKIAIOSFODNN7EXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY' },
      'us-east-1',
      new Date('2013-05-24T00:00:00Z'),
    );
    expect(signature).toBe('f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41');
    expect(authorization).toBe(
      'AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41',
    );
  });
});

describe('S3FileSystem', () => {
  it('stats and lists through paged listings; keys with spaces, unicode and reserved characters sign and read back', async () => {
    const names = ['dir/a.txt', 'dir/b c.txt', 'dir/sub/ü+(1)*.txt', 'dir/sub/d~e!.txt', 'dir/x.txt', 'dirt.txt', 'other/z.txt'];
    for (const name of names) server.put('data', name, `content of ${name}`);
    expect(await storage.stat('s3://data/dir/a.txt')).toMatchObject({ kind: 'file', bytes: 'content of dir/a.txt'.length });
    expect(await storage.stat('s3://data/dir')).toEqual({ kind: 'directory' });
    expect(await storage.stat('s3://data/dir/')).toEqual({ kind: 'directory' });
    expect(await storage.stat('s3://data/nothing')).toEqual({ kind: 'missing' });
    const listed = await storage.listFiles('s3://data/dir');
    // pageSize 3: six keys below dir/ take two pages; 'dirt.txt' shares the prefix 'dir' but not 'dir/'.
    expect(listed.map((file) => file.path)).toEqual(names.slice(0, 5).map((name) => `s3://data/${name}`).sort());
    expect(server.requests.filter((request) => request.query['list-type'] === '2' && request.query.prefix === 'dir/' && request.query['max-keys'] === undefined)).toHaveLength(2);
    for (const name of names) {
      const chunks: Buffer[] = [];
      for await (const chunk of storage.readStream(`s3://data/${name}`)) chunks.push(Buffer.from(chunk));
      expect(Buffer.concat(chunks).toString()).toBe(`content of ${name}`);
    }
  });

  it('reads at offsets through one read-ahead window, and streams from an offset', async () => {
    const bytes = Buffer.alloc(10 << 20);
    for (let index = 0; index < bytes.length; index++) bytes[index] = (index * 7) % 251;
    server.put('data', 'big.bin', bytes);
    const file = await storage.open('s3://data/big.bin');
    expect((await file.stat()).size).toBe(bytes.length);
    const gets = () => server.requests.filter((request) => request.method === 'GET').length;
    const buffer = new Uint8Array(1000);
    for (let position = 0; position < 1 << 20; position += 1000) {
      const { bytesRead } = await file.read(buffer, 0, 1000, position);
      expect(Buffer.from(buffer.subarray(0, bytesRead)).equals(bytes.subarray(position, position + bytesRead))).toBe(true);
    }
    // A thousand small sequential reads: one request for the window.
    expect(gets()).toBe(1);
    // The last 8 bytes, then the bytes before them (a footer's length, then the footer): one request.
    const tail = new Uint8Array(8);
    await file.read(tail, 0, 8, bytes.length - 8);
    await file.read(buffer, 0, 1000, bytes.length - 1008);
    expect(Buffer.from(buffer).equals(bytes.subarray(bytes.length - 1008, bytes.length - 8))).toBe(true);
    expect(gets()).toBe(2);
    await file.close();
    const chunks: Buffer[] = [];
    for await (const chunk of storage.readStream('s3://data/big.bin', 5_000_000)) chunks.push(Buffer.from(chunk));
    expect(Buffer.concat(chunks).equals(bytes.subarray(5_000_000))).toBe(true);
    expect(server.requests.at(-1)?.range).toBe('bytes=5000000-');
    // Past the end: nothing, not an error.
    for await (const _ of storage.readStream('s3://data/big.bin', bytes.length)) throw new Error('read past the end');
  });

  it('writes a small file as one PUT and a large one as a multipart upload that appears only when complete', async () => {
    const small = await storage.create('s3://data/out/small.txt');
    await small.write('hello ');
    await small.write(Buffer.from('world'));
    expect(server.bucket('data').has('out/small.txt')).toBe(false);
    await small.close();
    expect(server.bucket('data').get('out/small.txt')?.toString()).toBe('hello world');
    expect(server.requests.filter((request) => request.method === 'PUT')).toHaveLength(1);

    const writer = new S3FileSystem({ ...server.clientOptions, partBytes: 5 << 20, partsInFlight: 2 });
    const large = await writer.create('s3://data/out/large.bin');
    const piece = Buffer.alloc(1 << 20);
    const expected: Buffer[] = [];
    for (let index = 0; index < 13; index++) {
      piece.fill(index);
      await large.write(piece);
      expected.push(Buffer.from(piece));
    }
    expect(server.bucket('data').has('out/large.bin')).toBe(false);
    await large.close();
    expect(server.bucket('data').get('out/large.bin')?.equals(Buffer.concat(expected))).toBe(true);
    const parts = server.requests.filter((request) => request.method === 'PUT' && request.query.partNumber);
    // Two parts are in flight at once: they may arrive in either order.
    expect(parts.map((part) => [part.query.partNumber, part.bytes]).sort()).toEqual([['1', 5 << 20], ['2', 5 << 20], ['3', 3 << 20]]);
    expect(server.uploads.size).toBe(0);
  });

  it('an aborted upload leaves no object and no upload; a failed part fails close and cancels the upload', async () => {
    const writer = new S3FileSystem({ ...server.clientOptions, partBytes: 5 << 20, maxAttempts: 1 });
    const aborted = await writer.create('s3://data/out/aborted.bin');
    await aborted.write(Buffer.alloc(6 << 20));
    await aborted.abort();
    expect(server.bucket('data').has('out/aborted.bin')).toBe(false);
    expect(server.uploads.size).toBe(0);

    const failing = await writer.create('s3://data/out/failing.bin');
    server.fail(1, 500, 'InternalError', (method) => method === 'PUT');
    await failing.write(Buffer.alloc(5 << 20)).catch(() => undefined);
    await failing.write(Buffer.alloc(1 << 20)).catch(() => undefined);
    const error = await failing.close().then(() => undefined, (caught: unknown) => caught);
    expect(error).toBeInstanceOf(StorageError);
    expect((error as StorageError).code).toBe('ERR_STORAGE_UNAVAILABLE');
    expect(server.bucket('data').has('out/failing.bin')).toBe(false);
    expect(server.uploads.size).toBe(0);
  });

  it('renames by copy and delete, and removes a prefix with everything below it', async () => {
    server.put('data', 'stage/.a.tmp', 'staged');
    await storage.rename('s3://data/stage/.a.tmp', 's3://data/final/a.txt');
    expect(server.bucket('data').get('final/a.txt')?.toString()).toBe('staged');
    expect(server.bucket('data').has('stage/.a.tmp')).toBe(false);
    for (let index = 0; index < 5; index++) server.put('data', `gone/part=${index}/f.txt`, 'x');
    server.put('data', 'gone-not/keep.txt', 'x');
    await storage.remove('s3://data/gone');
    expect([...server.bucket('data').keys()].sort()).toEqual(['final/a.txt', 'gone-not/keep.txt']);
  });

  it('retries throttling and 5xx, then answers; refuses what a retry cannot cure with a typed error', async () => {
    server.put('data', 'f.txt', 'ok');
    server.fail(2, 503, 'SlowDown');
    const file = await storage.open('s3://data/f.txt');
    expect(server.requests.slice(0, 3).map((request) => request.status)).toEqual([503, 503, 200]);
    await file.close();

    server.fail(3, 503, 'SlowDown');
    const unavailable = await storage.listFiles('s3://data/f.txt').then(() => undefined, (caught: unknown) => caught as StorageError);
    expect(unavailable).toBeInstanceOf(StorageError);
    expect(unavailable).toMatchObject({ code: 'ERR_STORAGE_UNAVAILABLE', status: 503, storageCode: 'SlowDown', attempts: 3 });
    expect(unavailable!.message).toContain('s3://data/f.txt');

    const missing = await storage.open('s3://data/none.txt').then(() => undefined, (caught: unknown) => caught);
    expect(missing).toMatchObject({ code: 'ERR_STORAGE_NOT_FOUND' });

    const wrongSecret = new S3FileSystem({ ...server.clientOptions, secretAccessKey: 'wrong' });
    const denied = await wrongSecret.listFiles('s3://data/').then(() => undefined, (caught: unknown) => caught);
    expect(denied).toMatchObject({ code: 'ERR_STORAGE_ACCESS', status: 403, storageCode: 'SignatureDoesNotMatch' });

    const noBucket = await storage.listFiles('s3://nobucket/x').then(() => undefined, (caught: unknown) => caught);
    expect(noBucket).toMatchObject({ code: 'ERR_STORAGE_NOT_FOUND', storageCode: 'NoSuchBucket' });

    const down = new S3FileSystem({ endpoint: 'http://127.0.0.1:9', accessKeyId: 'k', secretAccessKey: 's', maxAttempts: 2 });
    const refused = await down.stat('s3://data/f.txt').then(() => undefined, (caught: unknown) => caught as StorageError);
    expect(refused).toMatchObject({ code: 'ERR_STORAGE_UNAVAILABLE', attempts: 2 });
    expect(refused!.message).toMatch(/no answer/);
  });

  it('resumes a read whose connection drops mid-body where it stopped, and refuses to splice a replaced object', async () => {
    const bytes = Buffer.alloc(3 << 20);
    for (let index = 0; index < bytes.length; index++) bytes[index] = (index * 13) % 256;
    server.put('data', 'long.bin', bytes);
    server.breakBodies(2, 1 << 20);
    const chunks: Buffer[] = [];
    for await (const chunk of storage.readStream('s3://data/long.bin')) chunks.push(Buffer.from(chunk));
    expect(Buffer.concat(chunks).equals(bytes)).toBe(true);
    const gets = server.requests.filter((request) => request.method === 'GET');
    expect(gets.map((request) => request.range)).toEqual([undefined, 'bytes=1048576-', 'bytes=2097152-']);
    // A ranged read (a footer, a column chunk) resumes the same way.
    server.breakBodies(1, 1000);
    const file = await storage.open('s3://data/long.bin');
    const window = new Uint8Array(5000);
    await file.read(window, 0, 5000, 100);
    expect(Buffer.from(window).equals(bytes.subarray(100, 5100))).toBe(true);
    // Replaced between the break and the resume: the read fails rather than mix two versions.
    server.breakBodies(1, 1 << 20);
    const reading = (async () => {
      let read = 0;
      for await (const chunk of storage.readStream('s3://data/long.bin')) {
        read += chunk.byteLength;
        if (read >= 1 << 20) server.put('data', 'long.bin', Buffer.alloc(3 << 20, 1));
      }
    })();
    await expect(reading).rejects.toMatchObject({ code: 'ERR_STORAGE_REQUEST', status: 412, storageCode: 'PreconditionFailed' });
    // Breaking off every time: a typed error after maxAttempts (3 here).
    server.breakBodies(3, 1000);
    await expect((async () => {
      for await (const _ of storage.readStream('s3://data/long.bin')) void _;
    })()).rejects.toMatchObject({ code: 'ERR_STORAGE_UNAVAILABLE', attempts: 3 });
  });

  it('takes credentials and endpoint from the environment, refuses bad options, and travels resolved', () => {
    const saved = { ...process.env };
    try {
      process.env.AWS_ACCESS_KEY_ID = 'ENVKEY';
      process.env.AWS_SECRET_ACCESS_KEY = 'env-secret';
      process.env.AWS_REGION = 'env-region';
      process.env.AWS_ENDPOINT_URL_S3 = 'http://127.0.0.1:1234/';
      const fromEnvironment = new S3FileSystem();
      expect(fromEnvironment.resolvedOptions).toMatchObject({ region: 'env-region', endpoint: 'http://127.0.0.1:1234', forcePathStyle: true, credentials: { accessKeyId: 'ENVKEY', secretAccessKey: 'env-secret' } });
      // Made again from what was resolved, wherever the environment says otherwise.
      const sent = unpack(pack({ filesystem: fromEnvironment })) as { filesystem: S3FileSystem };
      delete process.env.AWS_ACCESS_KEY_ID;
      expect(sent.filesystem).toBeInstanceOf(S3FileSystem);
      expect(sent.filesystem.resolvedOptions).toEqual(fromEnvironment.resolvedOptions);
      expect(new S3FileSystem({ anonymous: true, profile: 'none' }).resolvedOptions).toMatchObject({ credentials: undefined, fromProviders: false });
    } finally {
      process.env = saved;
    }
    expect(() => new S3FileSystem({ endpoint: 'not a url' })).toThrow(/is not a URL/);
    expect(() => new S3FileSystem({ accessKeyId: 'only-the-key' })).toThrow(/together/);
    expect(() => new S3FileSystem({ partBytes: 1024 })).toThrow(/partBytes/);
    expect(() => fileSystemFor('gs://bucket/x')).toThrow(/no filesystem reads gs:\/\//);
    expect(() => fileSystemFor('/local/path', storage)).toThrow(/local path/);
    expect(() => jsonlSource('s3://data/x.jsonl', { filesystem: {} as never })).toThrow(/must be a FileSystem/);
  });
});

describe('credentials from AWS providers', () => {
  /** A provider server that hands out numbered temporary keys, each registered with the S3 server; `lifetimeMs` until each expires. */
  async function providerServer(handle: (request: IncomingMessage, body: string, issue: () => { AccessKeyId: string; SecretAccessKey: string; Token: string; Expiration: string }) => { status: number; body: string }, lifetimeMs = 3_600_000) {
    let issued = 0;
    const seen: Array<{ method: string; url: string; headers: IncomingMessage['headers']; body: string }> = [];
    const issue = () => {
      issued++;
      const keys = { AccessKeyId: `TEMP${issued}`, SecretAccessKey: `temp-secret-${issued}`, Token: `token-${issued}`, Expiration: new Date(Date.now() + lifetimeMs).toISOString() };
      server.addCredentials(keys.AccessKeyId, keys.SecretAccessKey, keys.Token);
      return keys;
    };
    const http = createServer((request, response) => {
      let body = '';
      request.on('data', (chunk: Buffer) => (body += chunk));
      request.on('end', () => {
        seen.push({ method: request.method!, url: request.url!, headers: request.headers, body });
        const answer = handle(request, body, issue);
        response.writeHead(answer.status);
        response.end(answer.body);
      });
    });
    await new Promise<void>((resolve) => http.listen(0, '127.0.0.1', resolve));
    return { url: `http://127.0.0.1:${(http.address() as AddressInfo).port}`, seen, issued: () => issued, close: () => new Promise<void>((resolve) => http.close(() => resolve())) };
  }

  /** Runs `body` with only these AWS variables set (no keys, no credentials file, no instance metadata unless given). */
  async function withEnvironment(variables: Record<string, string>, body: () => Promise<void>): Promise<void> {
    const saved = { ...process.env };
    for (const name of Object.keys(process.env)) if (name.startsWith('AWS_')) delete process.env[name];
    Object.assign(process.env, { AWS_SHARED_CREDENTIALS_FILE: '/nonexistent/credentials', AWS_CONFIG_FILE: '/nonexistent/config', AWS_EC2_METADATA_DISABLED: 'true' }, variables);
    try {
      await body();
    } finally {
      process.env = saved;
    }
  }

  const endpointOnly = () => ({ endpoint: server.endpoint, region: server.region });

  it('exchanges a web identity token at STS for a role, and signs with the session it gives', async () => {
    const sts = await providerServer((_request, body, issue) => {
      const form = new URLSearchParams(body);
      if (form.get('Action') !== 'AssumeRoleWithWebIdentity' || form.get('WebIdentityToken') !== 'the-token') return { status: 403, body: '<ErrorResponse><Error><Code>AccessDenied</Code><Message>bad token</Message></Error></ErrorResponse>' };
      const keys = issue();
      return { status: 200, body: `<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>${keys.AccessKeyId}</AccessKeyId><SecretAccessKey>${keys.SecretAccessKey}</SecretAccessKey><SessionToken>${keys.Token}</SessionToken><Expiration>${keys.Expiration}</Expiration></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>` };
    });
    const tokenDir = mkdtempSync(join(tmpdir(), 'trellis-irsa-'));
    try {
      writeFileSync(join(tokenDir, 'token'), 'the-token\n');
      server.put('data', 'f.txt', 'signed by a role');
      await withEnvironment({ AWS_WEB_IDENTITY_TOKEN_FILE: join(tokenDir, 'token'), AWS_ROLE_ARN: 'arn:aws:iam::1:role/reader', AWS_ENDPOINT_URL_STS: sts.url, AWS_ROLE_SESSION_NAME: 'job' }, async () => {
        const roleStorage = new S3FileSystem(endpointOnly());
        expect(roleStorage.resolvedOptions).toMatchObject({ credentials: undefined, fromProviders: true });
        expect(await readText(roleStorage, 's3://data/f.txt')).toBe('signed by a role');
        expect(await readText(roleStorage, 's3://data/f.txt')).toBe('signed by a role');
        // Asked once: the session lasts an hour.
        expect(sts.issued()).toBe(1);
        expect(new URLSearchParams(sts.seen[0].body).get('RoleArn')).toBe('arn:aws:iam::1:role/reader');
        // A worker receives what the driver was given, and signs at once without asking STS.
        const sent = unpack(pack(roleStorage)) as S3FileSystem;
        expect(sent.resolvedOptions.providerCredentials).toMatchObject({ accessKeyId: 'TEMP1', sessionToken: 'token-1' });
        expect(await readText(sent, 's3://data/f.txt')).toBe('signed by a role');
        expect(sts.issued()).toBe(1);
      });
      await withEnvironment({ AWS_WEB_IDENTITY_TOKEN_FILE: join(tokenDir, 'missing'), AWS_ROLE_ARN: 'arn:aws:iam::1:role/reader', AWS_ENDPOINT_URL_STS: sts.url }, async () => {
        await expect(new S3FileSystem(endpointOnly()).stat('s3://data/f.txt')).rejects.toMatchObject({ code: 'ERR_STORAGE_ACCESS', message: expect.stringContaining('cannot be read') });
      });
      writeFileSync(join(tokenDir, 'token'), 'a-wrong-token');
      await withEnvironment({ AWS_WEB_IDENTITY_TOKEN_FILE: join(tokenDir, 'token'), AWS_ROLE_ARN: 'arn:aws:iam::1:role/reader', AWS_ENDPOINT_URL_STS: sts.url }, async () => {
        await expect(new S3FileSystem(endpointOnly()).stat('s3://data/f.txt')).rejects.toMatchObject({ code: 'ERR_STORAGE_ACCESS', message: expect.stringContaining('403 AccessDenied: bad token') });
      });
    } finally {
      rmSync(tokenDir, { recursive: true, force: true });
      await sts.close();
    }
  });

  it("runs a profile's credential_process for its credentials, once while they last, and names its failure", async () => {
    const dir = mkdtempSync(join(tmpdir(), 'trellis-process-'));
    try {
      server.addCredentials('PROC1', 'process-secret', 'process-token');
      server.put('data', 'f.txt', 'from a process');
      const expiration = new Date(Date.now() + 3_600_000).toISOString();
      writeFileSync(join(dir, 'creds.sh'), `echo run >> ${join(dir, 'runs')}\necho '{"Version": 1, "AccessKeyId": "PROC1", "SecretAccessKey": "process-secret", "SessionToken": "process-token", "Expiration": "${expiration}"}'\n`);
      writeFileSync(join(dir, 'fail.sh'), 'echo "no badge in the reader" >&2\nexit 3\n');
      writeFileSync(join(dir, 'v2.sh'), `echo '{"Version": 2, "AccessKeyId": "PROC1", "SecretAccessKey": "x"}'\n`);
      writeFileSync(
        join(dir, 'config'),
        `[default]\nregion = nowhere\n\n[profile batch]\ncredential_process = /bin/sh ${join(dir, 'creds.sh')}\n\n[profile broken]\ncredential_process = /bin/sh ${join(dir, 'fail.sh')}\n\n[profile future]\ncredential_process = /bin/sh ${join(dir, 'v2.sh')}\n\n[profile keys]\naws_access_key_id = CONFIGKEY\naws_secret_access_key = config-secret\n`,
      );
      await withEnvironment({ AWS_CONFIG_FILE: join(dir, 'config'), AWS_PROFILE: 'batch' }, async () => {
        const storage = new S3FileSystem(endpointOnly());
        expect(storage.resolvedOptions).toMatchObject({ credentials: undefined, fromProviders: true, profile: 'batch' });
        expect(await readText(storage, 's3://data/f.txt')).toBe('from a process');
        expect(await readText(storage, 's3://data/f.txt')).toBe('from a process');
        expect(readFileSync(join(dir, 'runs'), 'utf8').trim().split('\n')).toHaveLength(1);
        await expect(new S3FileSystem({ ...endpointOnly(), profile: 'broken' }).stat('s3://data/f.txt')).rejects.toMatchObject({
          code: 'ERR_STORAGE_ACCESS',
          message: expect.stringMatching(/credential_process of profile 'broken'.*failed \(3\): no badge in the reader/),
        });
        await expect(new S3FileSystem({ ...endpointOnly(), profile: 'future' }).stat('s3://data/f.txt')).rejects.toThrow(/Version 2; version 1 is the one AWS defines/);
        // Keys in a config file's profile are static credentials, as in the credentials file.
        expect(new S3FileSystem({ ...endpointOnly(), profile: 'keys' }).resolvedOptions.credentials).toEqual({ accessKeyId: 'CONFIGKEY', secretAccessKey: 'config-secret' });
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("exchanges the login `aws sso login` cached for the profile's SSO role, and says to log in again when it expired", async () => {
    const portal = await providerServer((request, _body, issue) => {
      const url = new URL(request.url!, 'http://portal');
      if (request.headers['x-amz-sso_bearer_token'] !== 'sso-access-token') return { status: 401, body: '{"message":"Session token not found or invalid"}' };
      if (url.pathname !== '/federation/credentials' || url.searchParams.get('role_name') !== 'Reader' || url.searchParams.get('account_id') !== '111122223333') return { status: 403, body: '{"message":"No access"}' };
      const keys = issue();
      return { status: 200, body: JSON.stringify({ roleCredentials: { accessKeyId: keys.AccessKeyId, secretAccessKey: keys.SecretAccessKey, sessionToken: keys.Token, expiration: Date.parse(keys.Expiration) } }) };
    });
    const home = mkdtempSync(join(tmpdir(), 'trellis-sso-'));
    try {
      server.put('data', 'f.txt', 'from an SSO role');
      const cache = join(home, '.aws', 'sso', 'cache');
      mkdirSync(cache, { recursive: true });
      const login = (key: string, expiresAt: number) =>
        writeFileSync(join(cache, `${createHash('sha1').update(key).digest('hex')}.json`), JSON.stringify({ accessToken: 'sso-access-token', expiresAt: new Date(expiresAt).toISOString() }));
      writeFileSync(
        join(home, 'config'),
        '[profile dev]\nsso_session = my-sso\nsso_account_id = 111122223333\nsso_role_name = Reader\n\n[sso-session my-sso]\nsso_start_url = https://example.awsapps.com/start\nsso_region = eu-west-1\n\n' +
          '[profile legacy]\nsso_start_url = https://legacy.awsapps.com/start\nsso_region = eu-west-1\nsso_account_id = 111122223333\nsso_role_name = Reader\n',
      );
      login('my-sso', Date.now() + 3_600_000);
      login('https://legacy.awsapps.com/start', Date.now() + 3_600_000);
      await withEnvironment({ AWS_CONFIG_FILE: join(home, 'config'), AWS_PROFILE: 'dev', AWS_ENDPOINT_URL_SSO: portal.url, HOME: home }, async () => {
        const storage = new S3FileSystem(endpointOnly());
        expect(await readText(storage, 's3://data/f.txt')).toBe('from an SSO role');
        expect(await readText(storage, 's3://data/f.txt')).toBe('from an SSO role');
        expect(portal.issued()).toBe(1);
        expect(await readText(new S3FileSystem({ ...endpointOnly(), profile: 'legacy' }), 's3://data/f.txt')).toBe('from an SSO role');
        login('my-sso', Date.now() - 60_000);
        await expect(new S3FileSystem(endpointOnly()).stat('s3://data/f.txt')).rejects.toMatchObject({
          code: 'ERR_STORAGE_ACCESS',
          message: expect.stringMatching(/SSO for profile 'dev'.*expired at .*run `aws sso login --profile dev`/),
        });
      });
    } finally {
      rmSync(home, { recursive: true, force: true });
      await portal.close();
    }
  });

  it("assumes a profile's role at STS with its source profile's credentials (signed with SigV4), through chains of roles", async () => {
    const secrets = new Map([['SRCKEY', { secret: 'src-secret', token: undefined as string | undefined }]]);
    const sts = await providerServer((request, body, issue) => {
      // Checks the signature as STS would: the same request signed again with the caller's secret.
      const authorization = String(request.headers.authorization ?? '');
      const keyId = /Credential=([^/]+)\//.exec(authorization)?.[1] ?? '';
      const known = secrets.get(keyId);
      const headers: Record<string, string> = { host: String(request.headers.host), 'content-type': String(request.headers['content-type']), 'x-amz-date': String(request.headers['x-amz-date']) };
      if (request.headers['x-amz-security-token']) headers['x-amz-security-token'] = String(request.headers['x-amz-security-token']);
      const expected = known && signRequest({ method: 'POST', encodedPath: '/', query: '', headers, payloadHash: sha256Hex(body) }, { accessKeyId: keyId, secretAccessKey: known.secret, ...(known.token ? { sessionToken: known.token } : {}) }, 'eu-west-1', new Date(Date.parse(headers['x-amz-date'].replace(/(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z/, '$1-$2-$3T$4:$5:$6Z'))), 'sts').authorization;
      if (!expected || expected !== authorization || (known.token && known.token !== request.headers['x-amz-security-token'])) {
        return { status: 403, body: '<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>bad signature</Message></Error></ErrorResponse>' };
      }
      const form = new URLSearchParams(body);
      if (form.get('Action') !== 'AssumeRole') return { status: 400, body: '<ErrorResponse><Error><Code>InvalidAction</Code><Message>no</Message></Error></ErrorResponse>' };
      const keys = issue();
      secrets.set(keys.AccessKeyId, { secret: keys.SecretAccessKey, token: keys.Token });
      return { status: 200, body: `<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>${keys.AccessKeyId}</AccessKeyId><SecretAccessKey>${keys.SecretAccessKey}</SecretAccessKey><SessionToken>${keys.Token}</SessionToken><Expiration>${keys.Expiration}</Expiration></Credentials></AssumeRoleResult></AssumeRoleResponse>` };
    });
    const dir = mkdtempSync(join(tmpdir(), 'trellis-roles-'));
    try {
      server.put('data', 'f.txt', 'from an assumed role');
      writeFileSync(
        join(dir, 'config'),
        [
          '[profile base]', 'aws_access_key_id = SRCKEY', 'aws_secret_access_key = src-secret', '',
          '[profile reader]', 'role_arn = arn:aws:iam::2:role/reader', 'source_profile = base', 'external_id = ext-1', 'role_session_name = nightly', 'region = eu-west-1', '',
          '[profile chained]', 'role_arn = arn:aws:iam::3:role/second', 'source_profile = reader', 'region = eu-west-1', '',
          '[profile mfa]', 'role_arn = arn:aws:iam::2:role/reader', 'source_profile = base', 'mfa_serial = arn:aws:iam::1:mfa/me', '',
          '[profile loop-a]', 'role_arn = arn:aws:iam::4:role/a', 'source_profile = loop-b', '',
          '[profile loop-b]', 'role_arn = arn:aws:iam::4:role/b', 'source_profile = loop-a', '',
        ].join('\n'),
      );
      await withEnvironment({ AWS_CONFIG_FILE: join(dir, 'config'), AWS_ENDPOINT_URL_STS: sts.url }, async () => {
        expect(await readText(new S3FileSystem({ ...endpointOnly(), profile: 'reader' }), 's3://data/f.txt')).toBe('from an assumed role');
        const first = new URLSearchParams(sts.seen[0].body);
        expect([first.get('RoleArn'), first.get('ExternalId'), first.get('RoleSessionName')]).toEqual(['arn:aws:iam::2:role/reader', 'ext-1', 'nightly']);
        // Two roles deep: the second AssumeRole is signed with the first's session.
        expect(await readText(new S3FileSystem({ ...endpointOnly(), profile: 'chained' }), 's3://data/f.txt')).toBe('from an assumed role');
        expect(sts.seen.slice(1).map((seen) => new URLSearchParams(seen.body).get('RoleArn'))).toEqual(['arn:aws:iam::2:role/reader', 'arn:aws:iam::3:role/second']);
        expect(sts.seen[2].headers['x-amz-security-token']).toBe('token-2');
        await expect(new S3FileSystem({ ...endpointOnly(), profile: 'mfa' }).stat('s3://data/f.txt')).rejects.toThrow(/asks for an MFA code/);
        await expect(new S3FileSystem({ ...endpointOnly(), profile: 'loop-a' }).stat('s3://data/f.txt')).rejects.toThrow(/more than four roles deep/);
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
      await sts.close();
    }
  });

  it("takes the container endpoint's credentials with its authorization token, and fetches them again before they expire", async () => {
    // Each set expires in 4 minutes: within the 5 minutes before expiry, so every request asks again.
    const container = await providerServer((request, _body, issue) => (request.headers.authorization === 'secret-auth' ? { status: 200, body: JSON.stringify(issue()) } : { status: 401, body: 'no' }), 4 * 60_000);
    try {
      server.put('data', 'f.txt', 'from a container');
      await withEnvironment({ AWS_CONTAINER_CREDENTIALS_FULL_URI: `${container.url}/v2/credentials`, AWS_CONTAINER_AUTHORIZATION_TOKEN: 'secret-auth' }, async () => {
        const podStorage = new S3FileSystem(endpointOnly());
        expect(await readText(podStorage, 's3://data/f.txt')).toBe('from a container');
        expect(await readText(podStorage, 's3://data/f.txt')).toBe('from a container');
        expect(container.issued()).toBe(2);
        expect(server.requests.filter((request) => request.method === 'GET').length).toBe(2);
      });
      await withEnvironment({ AWS_CONTAINER_CREDENTIALS_FULL_URI: `${container.url}/v2/credentials`, AWS_CONTAINER_AUTHORIZATION_TOKEN: 'wrong' }, async () => {
        await expect(new S3FileSystem(endpointOnly()).stat('s3://data/f.txt')).rejects.toMatchObject({ code: 'ERR_STORAGE_ACCESS', message: expect.stringContaining('answered 401') });
      });
    } finally {
      await container.close();
    }
  });

  it("asks the instance metadata service (IMDSv2: a session token first) for its role's credentials; without any provider, requests go unsigned", async () => {
    const metadata = await providerServer((request, _body, issue) => {
      if (request.method === 'PUT' && request.url === '/latest/api/token') return request.headers['x-aws-ec2-metadata-token-ttl-seconds'] ? { status: 200, body: 'imds-session' } : { status: 400, body: '' };
      if (request.headers['x-aws-ec2-metadata-token'] !== 'imds-session') return { status: 401, body: '' };
      if (request.url === '/latest/meta-data/iam/security-credentials/') return { status: 200, body: 'worker-role\n' };
      if (request.url === '/latest/meta-data/iam/security-credentials/worker-role') return { status: 200, body: JSON.stringify({ Code: 'Success', ...issue() }) };
      return { status: 404, body: '' };
    });
    try {
      server.put('data', 'f.txt', 'from an instance');
      await withEnvironment({ AWS_EC2_METADATA_DISABLED: 'false', AWS_EC2_METADATA_SERVICE_ENDPOINT: metadata.url }, async () => {
        expect(await readText(new S3FileSystem(endpointOnly()), 's3://data/f.txt')).toBe('from an instance');
        expect(metadata.seen.map((request) => `${request.method} ${request.url}`)).toEqual([
          'PUT /latest/api/token',
          'GET /latest/meta-data/iam/security-credentials/',
          'GET /latest/meta-data/iam/security-credentials/worker-role',
        ]);
      });
    } finally {
      await metadata.close();
    }
    // No provider answers: unsigned, and a refusal says how to give credentials.
    await withEnvironment({}, async () => {
      const error = await new S3FileSystem(endpointOnly()).listFiles('s3://data/').then(() => undefined, (caught: unknown) => caught as StorageError);
      expect(error).toMatchObject({ code: 'ERR_STORAGE_ACCESS', status: 403 });
      expect(error!.message).toContain('no credentials were found');
    });
  });
});

describe('file formats on s3:// URLs', () => {
  const write = async (sink: { write(blocks: Block[], context: WriteContext): Promise<WrittenFile>; onWriteStart?(): Promise<void> }, blocks: Block[], taskIndex = 0) => {
    await sink.onWriteStart?.();
    return sink.write(blocks, context(taskIndex));
  };
  const halves = (): Block[] => [rowsToBlock(rows.slice(0, 20)), rowsToBlock(rows.slice(20))];

  it('every format writes under a prefix (partitioned by a column) and reads back the same rows', async () => {
    const byId = (list: Row[]) => [...list].sort((a, b) => Number(a.id) - Number(b.id));
    const formats = [
      { sink: new ParquetDatasink('s3://data/parquet', { partitionBy: 'part', filesystem: storage }), source: () => parquetSource('s3://data/parquet', { filesystem: storage }) },
      { sink: new JsonlDatasink('s3://data/jsonl', { partitionBy: 'part', compression: 'gzip', filesystem: storage }), source: () => jsonlSource('s3://data/jsonl', { filesystem: storage }) },
      { sink: new CsvDatasink('s3://data/csv', { partitionBy: 'part', filesystem: storage }), source: () => csvSource('s3://data/csv', { filesystem: storage }) },
      { sink: new ArrowDatasink('s3://data/arrow', { partitionBy: 'part', filesystem: storage }), source: () => arrowSource('s3://data/arrow', { filesystem: storage }) },
    ];
    for (const [index, { sink, source }] of formats.entries()) {
      for (const [task, block] of halves().entries()) await write(sink, [block], task);
      const made = source();
      // The listing waits for the run: a URL's files are not known when the source is made.
      expect(() => made.files).toThrow(/listed when the dataset runs/);
      expect(made.estimateInMemorySize?.()).toBeUndefined();
      const { rows: read } = await readAll(made, 4);
      expect(byId(read), `format ${index}`).toEqual(byId(rows.map((row) => ({ ...row }))));
      expect(made.files.every((file) => file.path.startsWith('s3://data/') && /part=(even|odd)\//.test(file.path))).toBe(true);
    }
    // Nothing half written or staged was left behind.
    expect([...server.bucket('data').keys()].filter((key) => key.includes('.tmp'))).toEqual([]);
  });

  it('reads Parquet with column and row-group pruning by ranged reads, splitting a file over tasks by row groups', async () => {
    const sink = new ParquetDatasink('s3://data/pq', { rowGroupRows: 5, filesystem: storage });
    await write(sink, [rowsToBlock(rows)]);
    server.requests.length = 0;
    const { tasks, rows: read } = await readAll(parquetSource('s3://data/pq', { filesystem: storage, columns: ['id'], filter: [['id', '>=', 30]] }), 8);
    expect(read).toEqual(rows.filter((row) => Number(row.id) >= 30).map((row) => ({ id: row.id })));
    expect(tasks.length).toBeGreaterThan(1);
    // Ranged reads only (parquet-wasm asks for the footer, then each column chunk it reads).
    const gets = server.requests.filter((request) => request.method === 'GET' && !request.query['list-type']);
    expect(gets.length).toBeGreaterThan(0);
    expect(gets.every((request) => request.range?.startsWith('bytes='))).toBe(true);
  });

  it('reads JSONL split into byte ranges, compressed text, CSV, text and whole binary files from a prefix', async () => {
    const lines = rows.map((row) => JSON.stringify(row)).join('\n');
    server.put('data', 'in/a.jsonl', lines);
    server.put('data', 'in/b.jsonl.gz', gzipSync(lines));
    server.put('data', 'in/_SUCCESS', '');
    server.put('data', 'in/.hidden/c.jsonl', '{"id": -1}');
    const source = jsonlSource('s3://data/in', { filesystem: storage, minSplitBytes: 256 });
    const { tasks, rows: read } = await readAll(source, 6);
    expect(source.files.map((file) => file.path)).toEqual(['s3://data/in/a.jsonl', 's3://data/in/b.jsonl.gz']);
    expect(tasks.length).toBeGreaterThan(2);
    expect(read).toEqual([...rows, ...rows]);
    // Each range of the plain file asks for its bytes and a little past its end, not the rest of the file.
    const ranged = server.requests.filter((request) => request.path === 'data/in/a.jsonl' && request.method === 'GET');
    expect(ranged.length).toBeGreaterThan(1);
    expect(ranged.every((request) => request.range === undefined || /^bytes=\d+-\d+$/.test(request.range))).toBe(true);

    server.put('data', 'csv/x.csv', 'id,name\n1,a\n2,"b, c"\n');
    expect((await readAll(csvSource('s3://data/csv/x.csv', { filesystem: storage }))).rows).toEqual([{ id: 1, name: 'a' }, { id: 2, name: 'b, c' }]);
    server.put('data', 'text/t.txt', 'first\n\nsecond\n');
    expect((await readAll(textSource('s3://data/text', { filesystem: storage }))).rows).toEqual([{ text: 'first' }, { text: 'second' }]);
    for (let index = 0; index < 12; index++) server.put('data', `images/${String(index).padStart(2, '0')}.bin`, Buffer.from([index, index + 1]));
    const binary = await readAll(binarySource('s3://data/images', { filesystem: storage, includePaths: true }), 2);
    expect(binary.rows.map((row) => [row.path, Array.from(row.bytes as Uint8Array)])).toEqual(
      Array.from({ length: 12 }, (_, index) => [`s3://data/images/${String(index).padStart(2, '0')}.bin`, [index, index + 1]]),
    );
  });

  it('names a missing URL and a bad line by its URL; sink modes see what is under the prefix', async () => {
    await expect(readAll(jsonlSource('s3://data/missing', { filesystem: storage }))).rejects.toMatchObject({ code: 'ERR_DATA_PATH', message: expect.stringContaining("'s3://data/missing' does not exist") });
    server.put('data', 'bad/a.jsonl', '{"id": 1}\n{"id": 2\n');
    await expect(readAll(jsonlSource('s3://data/bad', { filesystem: storage }))).rejects.toMatchObject({ code: 'ERR_DATA_PARSE', message: expect.stringContaining("JSONL file 's3://data/bad/a.jsonl', line 2") });

    const sink = new JsonlDatasink('s3://data/modes', { filesystem: storage });
    await write(sink, [rowsToBlock(rows.slice(0, 3))]);
    server.put('data', 'modes/notes.md', 'not a dataset file');
    await expect(sink.prepareDirectory('error')).rejects.toThrow(/already holds 1 .jsonl file/);
    expect(await sink.prepareDirectory('ignore')).toBe(false);
    expect(await sink.prepareDirectory('overwrite')).toBe(true);
    expect([...server.bucket('data').keys()].filter((key) => key.startsWith('modes/'))).toEqual(['modes/notes.md']);
  });

  it('a checkpointed write stages each file under a hidden key and commits it by copy; temp files of dead attempts are removed', async () => {
    const sink = new JsonlDatasink('s3://data/staged', { filesystem: storage });
    const staged = await sink.write([rowsToBlock(rows.slice(0, 5))], { ...context(0, 1), staged: true });
    expect(staged.staged).toHaveLength(1);
    expect(staged.staged![0]).toMatch(/^s3:\/\/data\/staged\/\.job1_000000\.jsonl\.1\.\d+\.tmp$/);
    expect(server.bucket('data').has('staged/job1_000000.jsonl')).toBe(false);
    const committed = await sink.commit(staged);
    expect(committed.path).toBe('s3://data/staged/job1_000000.jsonl');
    expect(server.bucket('data').get('staged/job1_000000.jsonl')?.toString().split('\n').filter(Boolean)).toHaveLength(5);
    // An attempt that died left its temp file: the write's end removes this job's, not another's.
    server.put('data', 'staged/.job1_000001.jsonl.0.999.tmp', 'partial');
    server.put('data', 'staged/.job2_000000.jsonl.0.999.tmp', 'another job');
    await sink.onWriteComplete([committed]);
    expect([...server.bucket('data').keys()].sort()).toEqual(['staged/.job2_000000.jsonl.0.999.tmp', 'staged/job1_000000.jsonl']);
  });
});

describe('LocalFileSystem', () => {
  it('does on disk what the S3 filesystem does on a bucket', async () => {
    const local = new LocalFileSystem();
    const root = mkdtempSync(join(tmpdir(), 'trellis-fs-'));
    try {
      await local.makeDirectory(join(root, 'a/b'));
      const file = await local.create(join(root, 'a/b/f.txt'));
      await file.write('hello ');
      await file.write(Buffer.from('disk'));
      await file.sync();
      await file.close();
      expect(await local.stat(join(root, 'a/b/f.txt'))).toMatchObject({ kind: 'file', bytes: 10 });
      expect(await local.stat(join(root, 'a'))).toEqual({ kind: 'directory' });
      expect(await local.stat(join(root, 'none'))).toEqual({ kind: 'missing' });
      expect(await local.listFiles(root)).toEqual([{ path: join(root, 'a/b/f.txt'), bytes: 10 }]);
      const opened = await local.open(join(root, 'a/b/f.txt'));
      const buffer = new Uint8Array(4);
      expect((await opened.read(buffer, 0, 4, 6)).bytesRead).toBe(4);
      expect(Buffer.from(buffer).toString()).toBe('disk');
      await opened.close();
      const chunks: Buffer[] = [];
      for await (const chunk of local.readStream(join(root, 'a/b/f.txt'), 6)) chunks.push(Buffer.from(chunk));
      expect(Buffer.concat(chunks).toString()).toBe('disk');
      expect(Buffer.from(await (await local.openBlob(join(root, 'a/b/f.txt'))).slice(0, 5).arrayBuffer()).toString()).toBe('hello');
      const aborted = await local.create(join(root, 'a/b/gone.txt'));
      await aborted.write('partial');
      await aborted.abort();
      expect(await local.stat(join(root, 'a/b/gone.txt'))).toEqual({ kind: 'missing' });
      await local.rename(join(root, 'a/b/f.txt'), join(root, 'a/g.txt'));
      await local.remove(join(root, 'a/b'));
      expect(await local.listFiles(root)).toEqual([{ path: join(root, 'a/g.txt'), bytes: 10 }]);
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});

describe('checkpoint paths', () => {
  it('takes a URL for the checkpoint, and defaults to one beside a sink on object storage', async () => {
    const { checkCheckpointOptions } = await import('../../lib/data/checkpoint.js');
    expect(checkCheckpointOptions({ idColumn: 'id', path: 's3://data/ck' }, undefined).path).toBe('s3://data/ck');
    expect(checkCheckpointOptions({ idColumn: 'id' }, 's3://data/out/.trellis-checkpoint').path).toBe('s3://data/out/.trellis-checkpoint');
  });

  it('S3 files take a lock by a conditional write, and a touch moves their Last-Modified', async () => {
    expect(await storage.createExclusive('s3://data/ck/lock', Buffer.from('first'))).toBe(true);
    expect(await storage.createExclusive('s3://data/ck/lock', Buffer.from('second'))).toBe(false);
    expect(Buffer.from(await storage.readFile('s3://data/ck/lock')).toString()).toBe('first');
    const before = await storage.stat('s3://data/ck/lock');
    await new Promise((resolve) => setTimeout(resolve, 1100));
    await storage.touch('s3://data/ck/lock');
    const after = await storage.stat('s3://data/ck/lock');
    expect(after.kind === 'file' && before.kind === 'file' && after.modifiedMs! > before.modifiedMs!).toBe(true);
    expect(Buffer.from(await storage.readFile('s3://data/ck/lock')).toString()).toBe('first');
    await storage.writeFileDurably('s3://data/ck/manifest.json', Buffer.from('{}'));
    expect(Buffer.from(await storage.readFile('s3://data/ck/manifest.json')).toString()).toBe('{}');
    await expect(storage.readFile('s3://data/ck/none')).rejects.toMatchObject({ code: 'ERR_STORAGE_NOT_FOUND' });
  });
});
