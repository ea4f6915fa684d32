from setuptools import find_packages, setup

setup(
    name="pykvm",
    version="0.1.0",
    description="Python bindings for /dev/kvm and /dev/vfio, and a small VMM with PCI passthrough",
    packages=find_packages(include=["pykvm", "pykvm.*"]),
    python_requires=">=3.11",
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "numpy"],
    extras_require={"test": ["pytest", "hypothesis"]},
    cffi_modules=["pykvm/_build/build.py:ffibuilder"],
    entry_points={"console_scripts": ["pykvm = pykvm.cli:main"]},
    zip_safe=False,
)
