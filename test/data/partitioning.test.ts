/**
 * Hive partitioning: sinks given partitionBy write each group of rows under column=value
 * directories (the columns left out of the files), and every file source reads the values back
 * as columns; through a cluster job end to end for each format.
 */
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import { join, relative } from 'node:path';
import { describe, expect, it } from 'vitest';
import { InvalidArgumentError, fromItems, readArrow, readBinaryFiles, readCsv, readJsonl, readParquet, readText, type Row } from '../../lib/index.js';
import { HIVE_NULL } from '../../lib/data/formats/partitioning.js';
import { useDataCluster } from './helpers.js';

const { scratchDir } = useDataCluster({ numCpus: 2 });

function filesUnder(directory: string): string[] {
  const out: string[] = [];
  const walk = (current: string) => {
    for (const entry of readdirSync(current, { withFileTypes: true })) {
      if (entry.name.startsWith('.') || entry.name.startsWith('_')) continue;
      const path = join(current, entry.name);
      if (entry.isDirectory()) walk(path);
      else out.push(relative(directory, path));
    }
  };
  walk(directory);
  return out.sort();
}

const rows: Row[] = Array.from({ length: 60 }, (_, id) => ({ id, label: ['positive', 'negative', 'a b/c'][id % 3], year: id % 2 === 0 ? 2024 : null, score: id / 4 }));
const byId = (list: Row[]) => [...list].sort((a, b) => (a.id as number) - (b.id as number));

describe('partitioned writes and hive reads', () => {
  const formats = [
    { name: 'jsonl', write: 'writeJsonl', read: readJsonl, extension: '.jsonl' },
    { name: 'csv', write: 'writeCsv', read: readCsv, extension: '.csv' },
    { name: 'parquet', write: 'writeParquet', read: readParquet, extension: '.parquet' },
    { name: 'arrow', write: 'writeArrow', read: readArrow, extension: '.arrow' },
  ] as const;

  for (const format of formats) {
    it(`${format.name}: rows go under column=value directories and read back with their columns`, async () => {
      const directory = scratchDir.path(`partitioned-${format.name}`);
      const results = await fromItems(rows, { parallelism: 4 })[format.write](directory, { partitionBy: ['label', 'year'] });
      expect(results.reduce((sum, result) => sum + result.rows, 0)).toBe(60);
      const files = filesUnder(directory);
      const directories = [...new Set(files.map((file) => file.split('/').slice(0, 2).join('/')))].sort();
      expect(directories).toEqual(
        ['a%20b%2Fc', 'negative', 'positive'].flatMap((label) => [`label=${label}/year=2024`, `label=${label}/year=${HIVE_NULL}`]).sort(),
      );
      expect(files.every((file) => file.endsWith(format.extension))).toBe(true);
      expect(results.flatMap((result) => result.files ?? []).length).toBe(files.length);
      if (format.name === 'jsonl') {
        // The partition columns are in the paths, not in the files.
        const first = JSON.parse(readFileSync(join(directory, files[0]), 'utf8').split('\n')[0]);
        expect(Object.keys(first).sort()).toEqual(['id', 'score']);
      }
      const back = byId(await format.read(directory).takeAll());
      expect(back).toEqual(rows);
      // Off: the directories mean nothing.
      const plain = await format.read(directory, { partitioning: false }).takeAll();
      expect(Object.keys(plain[0]).sort()).toEqual(['id', 'score']);
    });
  }

  it('a group of one partition per read task: counts and filters by partition work as columns', async () => {
    const directory = scratchDir.path('partitioned-counts');
    await fromItems(rows, { parallelism: 3 }).writeParquet(directory, { partitionBy: 'label' });
    const counts = await readParquet(directory).groupBy('label').count().takeAll();
    expect(counts).toEqual([{ label: 'a b/c', 'count()': 20 }, { label: 'negative', 'count()': 20 }, { label: 'positive', 'count()': 20 }]);
    // A partition filter reads two of the three labels' files, and the job sees only their rows.
    const kept = readParquet(directory, { partitionFilter: ({ label }) => label !== 'negative' });
    expect(await kept.count()).toBe(40);
    expect((await kept.unique('label')).sort()).toEqual(['a b/c', 'positive']);
    expect(() => fromItems(rows).writeJsonl(scratchDir.path('bad'), { partitionBy: [] })).toThrow(InvalidArgumentError);
  });
});

describe('compressed, text and binary files through a job', () => {
  it('gzip-partitioned JSONL and brotli CSV written by a job read back; text and whole files read as datasets', async () => {
    const jsonl = scratchDir.path('gzip-partitioned');
    await fromItems(rows, { parallelism: 4 }).writeJsonl(jsonl, { partitionBy: 'label', compression: 'gzip' });
    expect(filesUnder(jsonl).every((file) => file.endsWith('.jsonl.gz'))).toBe(true);
    expect(byId(await readJsonl(jsonl).takeAll())).toEqual(rows.map(({ year, ...row }) => ({ ...row, year })));
    const csv = scratchDir.path('brotli-csv');
    await fromItems(rows, { parallelism: 2 }).writeCsv(csv, { compression: 'brotli', rowsPerFile: 25 });
    expect(filesUnder(csv).map((file) => file.slice(-7))).toEqual(['.csv.br', '.csv.br', '.csv.br']);
    expect(await readCsv(csv).count()).toBe(60);

    // The text of those rows, one per line, with a map over it.
    const text = scratchDir.path('text');
    mkdirSync(text);
    writeFileSync(join(text, 'labels.txt.gz'), gzipSync(rows.map((row) => row.label).join('\n')));
    const counts = await readText(text).groupBy('text').count().takeAll();
    expect(counts).toEqual([{ text: 'a b/c', 'count()': 20 }, { text: 'negative', 'count()': 20 }, { text: 'positive', 'count()': 20 }]);

    const images = scratchDir.path('images');
    mkdirSync(images);
    for (let index = 0; index < 9; index++) writeFileSync(join(images, `${index}.bin`), Buffer.alloc(100 + index, index));
    const files = readBinaryFiles(images, { includePaths: true, parallelism: 3 });
    expect(await files.count()).toBe(9);
    const sizes = (await files.takeAll()).map((row) => ({ name: String(row.path).split('/').pop(), size: (row.bytes as Uint8Array).length, first: (row.bytes as Uint8Array)[0] }));
    expect(sizes.sort((a, b) => (a.size as number) - (b.size as number))).toEqual(Array.from({ length: 9 }, (_, index) => ({ name: `${index}.bin`, size: 100 + index, first: index })));
  });
});
