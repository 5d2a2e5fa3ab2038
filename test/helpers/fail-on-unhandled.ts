/**
 * Loaded before the tests (.mocharc.json "require"): a promise rejected with nobody to catch it (an
 * assertion in a callback the test did not await) fails the test that is running, instead of
 * passing unseen.
 */
process.on('unhandledRejection', (reason) => {
  throw reason;
});
