/**
 * The order the suite's files start in: longest first (by test/durations.json, seconds each file
 * took in a CI run), so that on two lanes the long files do not end up last, one lane finishing
 * long after the other. A file the list lacks (a new one) counts as 10 s. Only the order changes:
 * every file still runs. Refresh the list from a CI log now and then; a stale one costs only
 * balance.
 */
import { readFileSync } from 'node:fs';
import { relative } from 'node:path';
import { BaseSequencer, type TestSpecification } from 'vitest/node';

const UNKNOWN_SECONDS = 10;
const durations = JSON.parse(readFileSync(new URL('./durations.json', import.meta.url), 'utf8')) as Record<string, number>;

export class LongestFirstSequencer extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const root = this.ctx.config.root;
    const seconds = (file: TestSpecification) => durations[relative(root, file.moduleId).split('\\').join('/')] ?? UNKNOWN_SECONDS;
    return [...files].sort((a, b) => seconds(b) - seconds(a));
  }
}
