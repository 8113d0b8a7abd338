// Tests run on the compiled output (npm run build first; deploy/test does both).
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/dist/test'],
  testMatch: ['**/*.test.js'],
  maxWorkers: 1,
};
