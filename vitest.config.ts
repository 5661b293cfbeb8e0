import { availableParallelism } from 'node:os';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { defineConfig } from 'vitest/config';
import { freshLibraryBuild } from './lib/core/worker-loader.js';

/**
 * Where the checkout's build is fresh (every lib/ module compiled no earlier than its source, as
 * `npm ci` leaves it), tests import the library's built modules natively, as its workers do (see
 * lib/core/worker-loader.ts): transforming the library for each of the suite's files costs about a
 * second of CPU apiece. A stale build (sources edited since) and the sources are tested.
 * TRELLIS_WORKER_FROM_SOURCES=1 tests the sources whatever the build.
 */
const build = freshLibraryBuild();
const escape = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

export default defineConfig({
  plugins: [
    {
      name: 'trellis-library-build',
      enforce: 'pre',
      resolveId(source, importer) {
        if (!build || !importer || !source.startsWith('.')) return null;
        const path = resolve(dirname(importer), source);
        if (!path.startsWith(build.sources + sep)) return null;
        return { id: join(build.build, relative(build.sources, path).replace(/\.[mc]?ts$/, '.js')), external: true };
      },
    },
  ],
  test: {
    include: ['test/**/*.test.ts'],
    // Workers import compiled twins of the tests' TypeScript, written here (see test/twins.ts).
    globalSetup: ['test/twins.ts'],
    // Two files at a time. A file rarely keeps both cores busy (it waits on worker start-up, on
    // sockets and on timers), so a second one fills the gaps: on 2 cores the suite takes about
    // three quarters of its serial time. Not more: each file starts processes of its own, and
    // tests that wait on heartbeats and timeouts need their processes scheduled promptly. Files
    // share /dev/shm and the temp directory safely, as every name there carries its process id.
    fileParallelism: true,
    maxWorkers: Math.min(2, availableParallelism()),
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    server: { deps: { external: build ? [new RegExp(`^${escape(build.build + sep)}`)] : [] } },
  },
});
