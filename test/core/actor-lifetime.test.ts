/**
 * Actors end with their last handle (lib/core/registry.ts, the cluster's actor holds), as Ray's
 * do: checked in a driver of its own run with --expose-gc, where dropped handles are collected.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { scriptArgs } from './helpers.js';

describe('actor lifetime', () => {
  it('ends an unnamed actor once no handle is left and its calls are done; borrows, names, held results and compiled graphs keep it', () => {
    const script = fileURLToPath(new URL('./fixtures/lifetime-driver.ts', import.meta.url));
    const run = spawnSync(process.execPath, ['--expose-gc', ...scriptArgs(script)], { encoding: 'utf8', timeout: 120_000 });
    expect(run.status, run.stderr).toBe(0);
    const report = JSON.parse(run.stdout.trim().split('\n').pop()!);
    expect(report).toEqual({
      // A dropped handle: the actor is dead and its process gone.
      droppedEnded: true,
      droppedState: 'dead',
      droppedCause: 'actor Counter ended: no handle to it was left',
      // A call in flight when the handle went finished first.
      inFlightResult: 5,
      inFlightEnded: true,
      // Another actor kept a handle: alive and callable through it, ended once it let go.
      borrowedAlive: true,
      borrowedCall: 11,
      borrowedEnded: true,
      // A name keeps an actor; getActor finds it.
      namedAlive: true,
      namedCall: 2,
      // A result it holds (tensor transport) keeps it until freed.
      heldAlive: true,
      heldEnded: true,
      // An actor a task made and dropped at once.
      workerCreatedEnded: true,
      // A compiled graph keeps its actors until teardown.
      graphAlive: true,
      graphResult: 101,
      graphEnded: true,
    });
  }, 150_000);
});
