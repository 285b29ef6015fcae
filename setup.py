from setuptools import find_packages, setup

setup(
    name="nnunet-topomae",
    version="0.1.0",
    description="Masked-autoencoder self-pretraining (TopoMAE, HybridMIM) for nnU-Net v2, inside the unforked nnU-Net workflow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nnunet_topomae", "nnunet_topomae.*"]),
    include_package_data=True,
    package_data={"nnunet_topomae": ["demo_data/**/*", "demo_data/*"]},
    python_requires=">=3.10",
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch>=2.4.1,<=2.14.1",  # monai 1.5.2 (nnunet-topomae evaluate) needs 2.4.1
        "dynamic-network-architectures>=0.4.4,<0.5",
        "batchgeneratorsv2>=0.3.6,<0.4",
        "batchgenerators>=0.25.5,<0.26",
        "timm>=1.0.22,<1.1",
        "gudhi>=3.11,<3.14",
        "scipy>=1.13,<1.18",
        "SimpleITK>=2.3,<2.6",
        "numpy>=1.26,<2.5",
        "matplotlib>=3.8,<3.12",
        # nnunet-topomae evaluate: HD95 and NSD (tested with 1.5.2 and 1.6.1 on torch 2.14.1)
        "monai>=1.5.2,<1.7",
        # nnunet-topomae evaluate: Betti b0 (tested with 4.1.1)
        "connected-components-3d>=4.1,<5",
    ],
    extras_require={
        "test": ["pytest>=8,<10"],
        # optional faster persistence backend (GPL-3.0, so never a required dependency)
        "fast": ["cripser>=0.0.37,<0.1"],
    },
    entry_points={"console_scripts": ["nnunet-topomae=nnunet_topomae.cli:main"]},
)
