"""What the tests share: tiny settings (tiny), generated images (images, messy), models and the
registry (models), projects as users have them (project) and servers under test (http)."""
