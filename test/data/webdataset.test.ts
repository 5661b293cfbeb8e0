/**
 * WebDataset shards in-process (no cluster): samples written as tar shards and read back; shards
 * made by GNU tar (ustar, GNU long names, PAX, gzip) read, and shards this writer makes read by GNU
 * tar; fields decoded by extension or kept as bytes; broken shards named; shards on s3://.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { blockToRows, concatBlocks, rowsToBlock, type Block, type Row } from '../../lib/data/block.js';
import type { Datasource } from '../../lib/data/datasource.js';
import { S3FileSystem } from '../../lib/data/filesystem/s3.js';
import { WebDatasetDatasink, webDatasetSource } from '../../lib/data/formats/index.js';
import { TAR_END, tarEntry } from '../../lib/data/formats/tar.js';
import { Tensor } from '../../lib/gpu/tensor.js';
import { decodeImage } from '../../lib/image/decode.js';
import { S3TestServer } from './fixtures/s3-server.js';

let root: string;
let next = 0;
const fresh = (name: string): string => {
  const path = join(root, `${name}-${next++}`);
  mkdirSync(path, { recursive: true });
  return path;
};

const hasTar = (() => {
  try {
    execFileSync('tar', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'trellis-webdataset-test-'));
});

afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

async function readAll(source: Datasource, parallelism = 1): Promise<Row[]> {
  const blocks: Block[] = [];
  for (const task of await source.getReadTasks(parallelism)) for await (const output of task.read()) blocks.push(output as Block);
  return blocks.length ? blockToRows(concatBlocks(blocks)) : [];
}

const longKey = `deep/${'x'.repeat(120)}/sample`;
const samples: Row[] = [
  { __key__: 'a/000001', jpg: new Uint8Array([0xff, 0xd8, 1, 2, 3]), json: { label: 'cat', score: 0.5 }, txt: 'a cat', cls: 3 },
  { __key__: 'a/000002', jpg: new Uint8Array([0xff, 0xd8, 4]), json: { label: 'dog', score: 0.25 }, txt: 'ü dog', cls: 7 },
  { __key__: longKey, jpg: new Uint8Array(1000).fill(9), json: { label: 'long', score: 1 }, txt: 'a name past 100 bytes', cls: 0 },
];

describe('WebDataset', () => {
  it('writes samples as a tar shard and reads them back, fields decoded by extension', async () => {
    const out = fresh('out');
    const sink = new WebDatasetDatasink(out);
    await sink.onWriteStart();
    const written = await sink.write([rowsToBlock(samples)], { writeId: 'job', taskIndex: 0, attempt: 0 });
    expect(written.path).toBe(join(out, 'job_000000.tar'));
    const rows = await readAll(webDatasetSource(out));
    expect(rows).toEqual(samples.map((sample) => ({ ...sample, __url__: written.path })));
    // decode: false keeps every field as its bytes.
    const raw = await readAll(webDatasetSource(out, { decode: false }));
    expect(Buffer.from(raw[0].json as Uint8Array).toString()).toBe('{"label":"cat","score":0.5}');
    expect(Buffer.from(raw[0].cls as Uint8Array).toString()).toBe('3');
  });

  it.skipIf(!hasTar)('its shards list and extract with GNU tar, names past 100 bytes included (skipped: no tar command)', async () => {
    const out = fresh('gnu-reads');
    const sink = new WebDatasetDatasink(out);
    await sink.onWriteStart();
    const { path } = await sink.write([rowsToBlock(samples)], { writeId: 'job', taskIndex: 0, attempt: 0 });
    const listed = execFileSync('tar', ['-tf', path!], { encoding: 'utf8' }).trim().split('\n');
    expect(listed).toEqual(samples.flatMap((sample) => ['jpg', 'json', 'txt', 'cls'].map((field) => `${sample.__key__ as string}.${field}`)));
    expect(execFileSync('tar', ['-xOf', path!, `${longKey}.txt`], { encoding: 'utf8' })).toBe('a name past 100 bytes');
    expect(execFileSync('tar', ['-xOf', path!, 'a/000002.jpg'])).toEqual(Buffer.from([0xff, 0xd8, 4]));
  });

  it.skipIf(!hasTar)('reads shards GNU tar made: gnu and pax formats, long names, gzip, several shards over tasks (skipped: no tar command)', async () => {
    const files = fresh('files');
    const put = (name: string, content: string | Buffer) => {
      mkdirSync(join(files, name, '..'), { recursive: true });
      writeFileSync(join(files, name), content);
    };
    put('s/0001.png', Buffer.from([137, 80, 78, 71]));
    put('s/0001.json', '{"caption": "first"}');
    put('s/0002.png', Buffer.from([137, 80]));
    put('s/0002.json', '{"caption": "second"}');
    put(`s/${'long'.repeat(30)}.json`, '{"caption": "long"}');
    const names = ['s/0001.png', 's/0001.json', 's/0002.png', 's/0002.json', `s/${'long'.repeat(30)}.json`];
    const shards = fresh('shards');
    execFileSync('tar', ['--format=gnu', '-cf', join(shards, 'a.tar'), '-C', files, ...names]);
    execFileSync('tar', ['--format=pax', '-cf', join(shards, 'b.tar'), '-C', files, ...names]);
    execFileSync('tar', ['--format=ustar', '-czf', join(shards, 'c.tar.gz'), '-C', files, ...names.slice(0, 4)]);
    const rows = await readAll(webDatasetSource(shards), 3);
    const expected = (url: string, long: boolean) => [
      { __key__: 's/0001', __url__: url, png: new Uint8Array([137, 80, 78, 71]), json: { caption: 'first' } },
      { __key__: 's/0002', __url__: url, png: new Uint8Array([137, 80]), json: { caption: 'second' } },
      ...(long ? [{ __key__: `s/${'long'.repeat(30)}`, __url__: url, png: null, json: { caption: 'long' } }] : []),
    ];
    expect(rows).toEqual([...expected(join(shards, 'a.tar'), true), ...expected(join(shards, 'b.tar'), true), ...expected(join(shards, 'c.tar.gz'), false)]);
  });

  it('names a broken shard: a bad checksum, a truncated archive, a sample with a field twice, malformed JSON', async () => {
    const shards = fresh('broken');
    const good = Buffer.concat([...tarEntry('k1.txt', Buffer.from('one')), ...tarEntry('k1.json', Buffer.from('{"a":1}')), TAR_END]);
    const corrupt = Buffer.from(good);
    corrupt[3] ^= 0xff;
    writeFileSync(join(shards, 'corrupt.tar'), corrupt);
    await expect(readAll(webDatasetSource(join(shards, 'corrupt.tar')))).rejects.toMatchObject({ code: 'ERR_DATA_PARSE', message: expect.stringMatching(/corrupt\.tar': not a tar archive \(the header at byte 0 fails its checksum\)/) });
    writeFileSync(join(shards, 'short.tar'), good.subarray(0, 600));
    await expect(readAll(webDatasetSource(join(shards, 'short.tar')))).rejects.toThrow(/short\.tar': the archive ends in the middle of an entry/);
    writeFileSync(join(shards, 'twice.tar'), Buffer.concat([...tarEntry('k1.txt', Buffer.from('one')), ...tarEntry('k1.txt', Buffer.from('two')), TAR_END]));
    await expect(readAll(webDatasetSource(join(shards, 'twice.tar')))).rejects.toThrow(/sample 'k1' has two 'txt' files/);
    writeFileSync(join(shards, 'json.tar'), Buffer.concat([...tarEntry('k1.json', Buffer.from('{oops')), TAR_END]));
    await expect(readAll(webDatasetSource(join(shards, 'json.tar')))).rejects.toThrow(/json\.tar', k1\.json: malformed JSON/);
    expect(() => webDatasetSource(shards, { decode: 'yes' as never })).toThrow(/'decode' must be a boolean/);
    const sink = new WebDatasetDatasink(fresh('dotted'));
    await expect(sink.write([rowsToBlock([{ __key__: 'a.b', txt: 'x' }])], { writeId: 'job', taskIndex: 0, attempt: 0 })).rejects.toThrow(/__key__ 'a.b' has a dot/);
  });

  it('decodes image fields into tensors when asked, naming an image that does not decode', async () => {
    const fixtures = join(import.meta.dirname, '..', 'image', 'fixtures');
    const jpeg = readFileSync(join(fixtures, 'baseline-420.jpg'));
    const png = readFileSync(join(fixtures, 'rgba.png'));
    const shards = fresh('images');
    writeFileSync(join(shards, 'a.tar'), Buffer.concat([
      ...tarEntry('s/1.jpg', jpeg), ...tarEntry('s/1.cls', Buffer.from('3')),
      ...tarEntry('s/2.png', png), ...tarEntry('s/2.cls', Buffer.from('5')),
      TAR_END,
    ]));
    const sized = await readAll(webDatasetSource(shards, { images: { size: [8, 10] } }));
    expect(sized.map((row) => [row.__key__, (row.jpg as Tensor | null)?.shape ?? null, (row.png as Tensor | null)?.shape ?? null, row.cls])).toEqual([
      ['s/1', [8, 10, 3], null, 3],
      ['s/2', null, [8, 10, 3], 5],
    ]);
    expect(((sized[0].jpg as Tensor).data as Uint8Array)).toEqual(decodeImage(jpeg, { size: [8, 10] }).data);
    const own = await readAll(webDatasetSource(shards, { images: true }));
    expect((own[1].png as Tensor).shape).toEqual([47, 61, 3]);
    expect((await readAll(webDatasetSource(shards)))[0].jpg).toBeInstanceOf(Uint8Array);
    writeFileSync(join(shards, 'b.tar'), Buffer.concat([...tarEntry('t/1.jpg', jpeg.subarray(0, 200)), TAR_END]));
    await expect(readAll(webDatasetSource(join(shards, 'b.tar'), { images: true }))).rejects.toThrow(/b\.tar', t\/1\.jpg: JPEG/);
    expect(() => webDatasetSource(shards, { images: true, decode: false })).toThrow(/contradict/);
    expect(() => webDatasetSource(shards, { images: { mode: 'P' as never } })).toThrow(/mode must be one of/);
  });

  it('reads and writes shards on s3://, each shard one GET', async () => {
    const server = new S3TestServer();
    await server.start();
    try {
      server.bucket('data');
      const storage = new S3FileSystem(server.clientOptions);
      const sink = new WebDatasetDatasink('s3://data/shards', { filesystem: storage });
      await sink.onWriteStart();
      await sink.write([rowsToBlock(samples.slice(0, 2))], { writeId: 'job', taskIndex: 0, attempt: 0 });
      await sink.write([rowsToBlock(samples.slice(2))], { writeId: 'job', taskIndex: 1, attempt: 0 });
      server.requests.length = 0;
      const rows = await readAll(webDatasetSource('s3://data/shards', { filesystem: storage }), 2);
      expect(rows.map((row) => row.__key__)).toEqual(samples.map((sample) => sample.__key__));
      expect(rows[2].__url__).toBe('s3://data/shards/job_000001.tar');
      expect(server.requests.filter((request) => request.method === 'GET' && !request.query['list-type'])).toHaveLength(2);
      // What GNU tar reads, this server stored: the same bytes a local shard holds.
      const local = fresh('compare');
      const localSink = new WebDatasetDatasink(local);
      await localSink.onWriteStart();
      await localSink.write([rowsToBlock(samples.slice(2))], { writeId: 'job', taskIndex: 1, attempt: 0 });
      expect(server.bucket('data').get('shards/job_000001.tar')!.length).toBe(readFileSync(join(local, 'job_000001.tar')).length);
    } finally {
      await server.close();
    }
  });
});
